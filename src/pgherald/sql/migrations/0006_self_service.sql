-- Migration 6: self-service in the web console. A user may give an e-mail address, and
-- subscribe themselves to the watches they may read by feed or e-mail: the console makes
-- sinks that belong to that user (owner). Removing the user removes their sinks, with
-- their subscriptions and deliveries.

ALTER TABLE web_users ADD COLUMN email text
    CHECK (email IS NULL OR (email <> '' AND length(email) <= 254));

ALTER TABLE sinks ADD COLUMN owner text
    REFERENCES web_users (name) ON DELETE CASCADE ON UPDATE CASCADE;
CREATE INDEX sinks_owner_idx ON sinks (owner) WHERE owner IS NOT NULL;
