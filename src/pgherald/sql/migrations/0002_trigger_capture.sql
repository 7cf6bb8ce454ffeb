-- Migration 2: trigger capture (its queue, its wake-up switch and its trigger function),
-- and 'message' events for listen watches.

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
-- so roles that write the watched tables need no rights on the queue; with names
-- qualified and a fixed search_path, so they cannot redirect it. Built with format() to
-- qualify names with this store's schema, whatever it is called.
DO $install$
DECLARE
    store text := current_schema();
    channel text := CASE
        WHEN octet_length(current_schema()) <= 40 THEN current_schema() || '_wake'
        ELSE 'pgherald_wake_' || left(md5(current_schema()), 16)
    END;
BEGIN
    EXECUTE format($create$
CREATE FUNCTION %1$I.capture_change() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
    old_row jsonb;
    new_row jsonb;
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO %1$I.trigger_queue (watch, op, new_row)
        VALUES (TG_ARGV[0], 'insert', to_jsonb(NEW));
    ELSIF TG_OP = 'UPDATE' THEN
        old_row := to_jsonb(OLD);
        new_row := to_jsonb(NEW);
        IF TG_ARGV[2] <> '' THEN
            -- Only the watched columns count.
            IF NOT EXISTS (
                SELECT FROM unnest(TG_ARGV[2]::text[]) AS w(name)
                WHERE old_row -> w.name IS DISTINCT FROM new_row -> w.name
            ) THEN
                RETURN NULL;
            END IF;
        ELSIF TG_ARGV[1] = '{}' THEN
            IF old_row = new_row THEN
                RETURN NULL;
            END IF;
        ELSIF old_row - TG_ARGV[1]::text[] = new_row - TG_ARGV[1]::text[] THEN
            RETURN NULL;
        END IF;
        INSERT INTO %1$I.trigger_queue (watch, op, old_row, new_row)
        VALUES (TG_ARGV[0], 'update', old_row, new_row);
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO %1$I.trigger_queue (watch, op, old_row)
        VALUES (TG_ARGV[0], 'delete', to_jsonb(OLD));
    ELSE
        INSERT INTO %1$I.trigger_queue (watch, op) VALUES (TG_ARGV[0], 'truncate');
    END IF;
    IF (SELECT armed FROM %1$I.trigger_wake) THEN
        PERFORM pg_notify(%2$L, '');
    END IF;
    RETURN NULL;
END
$body$
$create$, store, channel);
END
$install$;

-- Listen watches store notifications as 'message' events.
ALTER TABLE events DROP CONSTRAINT events_op_check;
ALTER TABLE events ADD CONSTRAINT events_op_check
    CHECK (op IN ('insert', 'update', 'delete', 'truncate', 'read', 'schema', 'message'));
