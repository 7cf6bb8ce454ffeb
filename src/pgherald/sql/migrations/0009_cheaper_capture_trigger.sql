-- Migration 9: a cheaper capture_change(), the trigger function of trigger watches, for
-- the writers' sake (it runs once per changed row, in their transactions):
--
-- - The wake-up switch is an advisory lock that pgherald holds (on its LISTEN connection)
--   while it sleeps: a writer's row tries it shared and sends the NOTIFY if that fails.
--   That replaces reading trigger_wake.armed at every row, a query of its own each time.
--   A lock got is held to the transaction's end, so its later rows find it at once in
--   their own lock table, and pgherald arms only when no writer is between its first
--   captured row and its end (see sources/trigger.py). A pgherald that dies loses the
--   lock with its connection: writers stop sending NOTIFYs nobody reads.
-- - It has no SET search_path clause, which made every call save, set and restore the
--   setting. It stays safe as a SECURITY DEFINER function because it never consults the
--   search path: every table, function, type and operator it names is schema-qualified
--   (OPERATOR(pg_catalog.=) for =, and no IS DISTINCT FROM, which looks = up by name), so
--   objects that a writer puts early in its search_path (or in pg_temp) are never found.
--
-- Measured (bench_trigger.py --part function): about 63 -> 47 us of the writer's backend
-- per one-row INSERT transaction (no trigger: 12), 29.5 -> 21 us per row of a big one.
-- CREATE OR REPLACE keeps the function's identity, so the capture triggers on watched
-- tables stay as they are and call the new body from the next row on.
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
CREATE OR REPLACE FUNCTION %1$I.capture_change() RETURNS trigger
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
