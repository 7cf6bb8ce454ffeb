-- Migration 5: the web console's people. Each user has one role (admin: everything;
-- editor: watches and subscriptions; viewer: reads the watches on their allow-list), a
-- password hashed with argon2, and a session generation that a password change bumps,
-- which ends that user's sessions everywhere. The console signs its cookies with a
-- secret kept here, unless one is configured.

CREATE TABLE web_users (
    name text PRIMARY KEY CHECK (name <> '' AND length(name) <= 100),
    password_hash text NOT NULL,
    role text NOT NULL CHECK (role IN ('admin', 'editor', 'viewer')),
    session_generation integer NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now(),
    last_login_at timestamptz
);

-- The watches a viewer may read. Removing a watch removes it here: a new watch that is
-- given the same name later is not readable until it is allowed again.
CREATE TABLE web_user_watches (
    user_name text NOT NULL REFERENCES web_users (name) ON DELETE CASCADE ON UPDATE CASCADE,
    watch text NOT NULL REFERENCES watches (name) ON DELETE CASCADE ON UPDATE CASCADE,
    PRIMARY KEY (user_name, watch)
);
CREATE INDEX web_user_watches_watch_idx ON web_user_watches (watch);

-- Secrets the console generated for itself (the cookie signing key), by name.
CREATE TABLE web_secrets (
    name text PRIMARY KEY,
    value text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
