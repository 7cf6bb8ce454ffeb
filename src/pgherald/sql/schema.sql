-- pgherald's store, at its latest version, in one file.
--
-- Installs go through sql/migrations/ (store/migrations.py); this file is the reference
-- that a test proves equal to the result of all migrations, and what a reader studies
-- to learn the store. Names are unqualified: it runs with search_path set to the
-- store's schema (default "pgherald").

-- The applied migrations; the highest version is the schema's version.
CREATE TABLE schema_version (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- What to watch and how; one row per watch, with its running status.
CREATE TABLE watches (
    name text PRIMARY KEY CHECK (name <> ''),
    schema_name text,
    table_name text,
    method text NOT NULL CHECK (method IN ('logical', 'trigger', 'snapshot', 'listen')),
    key_columns text[] NOT NULL DEFAULT '{}',
    columns text[],                                  -- NULL: every column
    ignore_columns text[] NOT NULL DEFAULT '{}',
    query text,                                      -- snapshot watches of a SQL query
    options jsonb NOT NULL DEFAULT '{}',
    enabled boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    last_run_at timestamptz,
    last_success_at timestamptz,
    last_error text,
    changes_seen bigint NOT NULL DEFAULT 0,
    status text NOT NULL DEFAULT 'new',
    -- How long its events are kept, as written ("400d", "forever"); NULL: the
    -- configuration's `retain`, else forever (pgherald.retain, pgherald.pruning).
    retain text CHECK (retain <> ''),
    CONSTRAINT watches_table_or_query CHECK (
        method = 'listen' OR table_name IS NOT NULL OR query IS NOT NULL
    )
);

-- One capture pass: a snapshot comparison, a trigger queue drain, a logical session.
CREATE TABLE runs (
    id bigserial PRIMARY KEY,
    watch text,                                      -- NULL: a run of a whole source
    source text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    ended_at timestamptz,
    status text NOT NULL DEFAULT 'running'
        CHECK (status IN ('running', 'ok', 'error', 'aborted')),
    inserts bigint NOT NULL DEFAULT 0,
    updates bigint NOT NULL DEFAULT 0,
    deletes bigint NOT NULL DEFAULT 0,
    truncates bigint NOT NULL DEFAULT 0,
    rows_compared bigint,
    error text
);
CREATE INDEX runs_watch_started_idx ON runs (watch, started_at DESC);
CREATE INDEX runs_started_idx ON runs (started_at DESC);

-- What went wrong, when and where, for the dashboard and for `pgherald status`.
CREATE TABLE errors (
    id bigserial PRIMARY KEY,
    occurred_at timestamptz NOT NULL DEFAULT now(),
    watch text,
    run_id bigint REFERENCES runs (id) ON DELETE SET NULL,
    source text,
    message text NOT NULL,
    detail jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX errors_occurred_idx ON errors (occurred_at DESC);
CREATE INDEX errors_watch_occurred_idx ON errors (watch, occurred_at DESC);
CREATE INDEX errors_run_idx ON errors (run_id);

-- Row shapes (ordered [name, type_oid, type_name] lists), stored once and shared by events.
CREATE TABLE shapes (
    id serial PRIMARY KEY,
    digest text NOT NULL UNIQUE,
    columns jsonb NOT NULL,
    names text[] NOT NULL,                           -- the column names, for SQL that works by name
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The change log. Values are PostgreSQL's text output, aligned with the shape's columns.
CREATE TABLE events (
    id bigserial PRIMARY KEY,                        -- log order
    event_id text NOT NULL UNIQUE,                   -- stable across replays: the idempotency key
    watch text NOT NULL,
    op text NOT NULL
        CHECK (op IN ('insert', 'update', 'delete', 'truncate', 'read', 'schema', 'message', 'gap')),
    schema_name text NOT NULL,
    table_name text NOT NULL,
    row_key text,                                    -- JSON array of the key columns' texts
    key_columns text[] NOT NULL DEFAULT '{}',
    -- Shapes are not checked by foreign keys (migration 10): they are stored before any
    -- event names them, and never deleted.
    shape_id integer,                                -- shape of new_values (of old_values if none)
    old_shape_id integer,                            -- shape of old_values when it differs
    old_values text[],
    new_values text[],
    unchanged text[],                                -- new columns left as unchanged TOAST
    old_unchanged text[],                            -- old columns left as unchanged TOAST
    changed text[],
    xid bigint,
    position text NOT NULL,
    commit_time timestamptz,
    captured_at timestamptz NOT NULL,
    method text NOT NULL CHECK (method IN ('logical', 'trigger', 'snapshot', 'listen')),
    seq integer NOT NULL DEFAULT 0,
    old_values_source text NOT NULL DEFAULT 'none'
        CHECK (old_values_source IN ('replica_identity', 'change_log', 'snapshot', 'trigger', 'none')),
    meta jsonb NOT NULL DEFAULT '{}'
);
-- Few indexes on purpose: each one costs every append. A row's history (and filling old
-- values from it), a watch's events in log order, and `--since` / retention by time.
CREATE INDEX events_watch_row_key_idx ON events (watch, row_key, id);
CREATE INDEX events_watch_id_idx ON events (watch, id);
CREATE INDEX events_captured_at_idx ON events (captured_at);
-- A snapshot run's changes (their position is the run's id), for its page and digests.
-- Partial: appends of other capture methods do not pay for it.
CREATE INDEX events_snapshot_run_idx ON events (watch, position, id)
    WHERE method = 'snapshot';

-- Field-level detail of updates: one row per changed column.
-- event_id is not a foreign key (migration 11): field rows are written with their event,
-- and pruning deletes them with it.
CREATE TABLE event_fields (
    event_id bigint NOT NULL,
    column_name text NOT NULL,
    old_value text,
    new_value text,
    PRIMARY KEY (event_id, column_name)
);

-- How far each source got; saved in the transaction that stores its events.
CREATE TABLE checkpoints (
    source text PRIMARY KEY,
    position text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Destinations and who gets what (delivery builds on these).
CREATE TABLE sinks (
    name text PRIMARY KEY CHECK (name <> ''),
    kind text NOT NULL,
    format text NOT NULL DEFAULT 'pgherald',
    config jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    enabled boolean NOT NULL DEFAULT true,
    strictly_ordered boolean NOT NULL DEFAULT false,
    max_attempts integer NOT NULL DEFAULT 10 CHECK (max_attempts >= 1)
);

CREATE TABLE subscriptions (
    id bigserial PRIMARY KEY,
    sink text NOT NULL REFERENCES sinks (name) ON DELETE CASCADE ON UPDATE CASCADE,
    watch text NOT NULL REFERENCES watches (name) ON DELETE CASCADE ON UPDATE CASCADE,
    filter jsonb NOT NULL DEFAULT '{}',
    ignore_columns text[] NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (sink, watch),
    from_event bigint NOT NULL DEFAULT 0              -- events after this log id are its
);
CREATE INDEX subscriptions_watch_idx ON subscriptions (watch);

CREATE TABLE deliveries (
    id bigserial PRIMARY KEY,
    event_id bigint NOT NULL,                         -- not a foreign key (migration 11)
    sink text NOT NULL REFERENCES sinks (name) ON DELETE CASCADE ON UPDATE CASCADE,
    status text NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'delivering', 'delivered', 'failed', 'dead')),
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error text,
    delivered_at timestamptz,
    claimed_by text,
    claimed_until timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (event_id, sink),
    order_key text NOT NULL DEFAULT ''                -- the row (watch and key): one row's
                                                     -- events go out in log order
);
CREATE INDEX deliveries_sink_status_idx ON deliveries (sink, status);
-- Claims: a sink's open deliveries in log order.
CREATE INDEX deliveries_claim_idx ON deliveries (sink, id)
    WHERE status IN ('pending', 'failed');
-- "Is an earlier delivery of this row still open?" (per-row order).
CREATE INDEX deliveries_order_idx ON deliveries (sink, order_key, id)
    WHERE status IN ('pending', 'failed', 'delivering');
-- A feed is its sink's delivered deliveries, newest first.
CREATE INDEX deliveries_delivered_idx ON deliveries (sink, event_id DESC)
    WHERE status = 'delivered';

-- Every attempt to deliver, with its outcome.
CREATE TABLE delivery_attempts (
    id bigserial PRIMARY KEY,
    delivery_id bigint NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    attempted_at timestamptz NOT NULL DEFAULT now(),
    outcome text NOT NULL CHECK (outcome IN ('delivered', 'retry', 'dead')),
    error text
);
CREATE INDEX delivery_attempts_delivery_idx ON delivery_attempts (delivery_id);

-- Trigger capture's queue: rows appended by capture_change() in the writer's own
-- transaction, moved into the change log (and deleted here) by pgherald in one
-- transaction of its own. It carries the data; the NOTIFY only wakes pgherald up. Rows
-- churn, so autovacuum looks at it after a fixed number of dead rows, not a fraction.
CREATE TABLE trigger_queue (
    id bigserial PRIMARY KEY,
    watch text NOT NULL,
    op text NOT NULL CHECK (op IN ('insert', 'update', 'delete', 'truncate')),
    old_row jsonb,
    new_row jsonb,
    xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    xact_time timestamptz NOT NULL DEFAULT now()
) WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000);

-- Whether writers should send the wake-up NOTIFY. pgherald arms it when it goes idle and
-- disarms it while it is busy draining (it polls then): a NOTIFY serialises the commits
-- of every transaction that sends one, so writers pay for it only when it buys latency.
CREATE TABLE trigger_wake (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    armed boolean NOT NULL DEFAULT true
);
INSERT INTO trigger_wake DEFAULT VALUES;

-- The trigger function of every trigger watch. Arguments: the watch's name, its ignored
-- columns and its watched columns (text[] literals; '' = every column). SECURITY DEFINER,
-- so roles that write the watched tables need no rights on the queue. It never consults
-- the search path, so writers cannot redirect it: every table, function, type and
-- operator it names is schema-qualified (OPERATOR(pg_catalog.=), and no IS DISTINCT FROM,
-- which looks = up by name); a SET search_path clause would cost every call a save and a
-- restore. Its wake-up switch is an advisory lock that pgherald holds while it sleeps
-- (trigger_wake.armed shows it). Built with format() to qualify names with this store's
-- schema, whatever it is called.
DO $install$
DECLARE
    store text := current_schema();
    channel text := CASE
        WHEN octet_length(current_schema()) <= 40 THEN current_schema() || '_wake'
        ELSE 'pgherald_wake_' || left(md5(current_schema()), 16)
    END;
    wake_lock bigint := hashtext('pgherald.trigger_wake:' || current_schema());
BEGIN
    EXECUTE format($create$
CREATE FUNCTION %1$I.capture_change() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $body$
DECLARE
    old_row pg_catalog.jsonb;
    new_row pg_catalog.jsonb;
BEGIN
    IF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN
        INSERT INTO %1$I.trigger_queue (watch, op, new_row)
        VALUES (TG_ARGV[0], 'insert', pg_catalog.to_jsonb(NEW));
    ELSIF TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN
        old_row := pg_catalog.to_jsonb(OLD);
        new_row := pg_catalog.to_jsonb(NEW);
        IF TG_ARGV[2] OPERATOR(pg_catalog.<>) '' THEN
            -- Only the watched columns count.
            IF NOT EXISTS (
                SELECT FROM pg_catalog.unnest(TG_ARGV[2]::pg_catalog.text[]) AS w(name)
                WHERE NOT COALESCE(
                    (old_row OPERATOR(pg_catalog.->) w.name)
                        OPERATOR(pg_catalog.=) (new_row OPERATOR(pg_catalog.->) w.name),
                    (old_row OPERATOR(pg_catalog.->) w.name) IS NULL
                        AND (new_row OPERATOR(pg_catalog.->) w.name) IS NULL)
            ) THEN
                RETURN NULL;
            END IF;
        ELSIF TG_ARGV[1] OPERATOR(pg_catalog.=) '{}' THEN
            IF old_row OPERATOR(pg_catalog.=) new_row THEN
                RETURN NULL;
            END IF;
        ELSIF (old_row OPERATOR(pg_catalog.-) TG_ARGV[1]::pg_catalog.text[])
              OPERATOR(pg_catalog.=) (new_row OPERATOR(pg_catalog.-) TG_ARGV[1]::pg_catalog.text[])
        THEN
            RETURN NULL;
        END IF;
        INSERT INTO %1$I.trigger_queue (watch, op, old_row, new_row)
        VALUES (TG_ARGV[0], 'update', old_row, new_row);
    ELSIF TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN
        INSERT INTO %1$I.trigger_queue (watch, op, old_row)
        VALUES (TG_ARGV[0], 'delete', pg_catalog.to_jsonb(OLD));
    ELSE
        INSERT INTO %1$I.trigger_queue (watch, op) VALUES (TG_ARGV[0], 'truncate');
    END IF;
    -- Wake pgherald if it sleeps: it holds this lock then, so the shared try fails.
    IF NOT pg_catalog.pg_try_advisory_xact_lock_shared(%3$L::pg_catalog.int8) THEN
        PERFORM pg_catalog.pg_notify(%2$L, '');
    END IF;
    RETURN NULL;
END
$body$
$create$, store, channel, wake_lock);
END
$install$;

-- The web console's users: a role each (admin: everything; editor: watches and
-- subscriptions; viewer: reads the watches on their allow-list), an argon2 password hash,
-- and a session generation that a new password bumps, ending that user's sessions.
CREATE TABLE web_users (
    name text PRIMARY KEY CHECK (name <> '' AND length(name) <= 100),
    password_hash text NOT NULL,
    role text NOT NULL CHECK (role IN ('admin', 'editor', 'viewer')),
    session_generation integer NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now(),
    last_login_at timestamptz,
    email text CHECK (email IS NULL OR (email <> '' AND length(email) <= 254))
);

-- The watches a viewer may read. Removing a watch removes it here: a new watch that is
-- given the same name later is not readable until it is allowed again.
CREATE TABLE web_user_watches (
    user_name text NOT NULL REFERENCES web_users (name) ON DELETE CASCADE ON UPDATE CASCADE,
    watch text NOT NULL REFERENCES watches (name) ON DELETE CASCADE ON UPDATE CASCADE,
    PRIMARY KEY (user_name, watch)
);
CREATE INDEX web_user_watches_watch_idx ON web_user_watches (watch);

-- Sinks a user made for themselves in the console (self-service feeds and e-mail): they go
-- with their owner.
ALTER TABLE sinks ADD COLUMN owner text
    REFERENCES web_users (name) ON DELETE CASCADE ON UPDATE CASCADE;
CREATE INDEX sinks_owner_idx ON sinks (owner) WHERE owner IS NOT NULL;

-- Secrets the console generated for itself (the cookie signing key), by name.
CREATE TABLE web_secrets (
    name text PRIMARY KEY,
    value text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

INSERT INTO schema_version (version) VALUES (11);
