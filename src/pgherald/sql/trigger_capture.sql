-- Named statements of trigger capture (sources/trigger.py and sources/trigger_admin.py).
-- The queue lives in the store's schema; names in {braces} are filled with
-- psycopg.sql.Identifier, values are parameters.

-- name: install_row_trigger
-- AFTER, so the row is final (other triggers have run) and only committed writes count.
CREATE OR REPLACE TRIGGER {trigger}
AFTER INSERT OR UPDATE OR DELETE ON {table}
FOR EACH ROW EXECUTE FUNCTION {function}({watch}, {ignored}, {watched})

-- name: install_truncate_trigger
CREATE OR REPLACE TRIGGER {trigger}
AFTER TRUNCATE ON {table}
FOR EACH STATEMENT EXECUTE FUNCTION {function}({watch}, {ignored}, {watched})

-- name: find_capture_triggers
-- pgherald's capture triggers on one table (those calling this store's capture_change).
SELECT t.tgname
FROM pg_trigger t
JOIN pg_proc p ON p.oid = t.tgfoid
JOIN pg_namespace pn ON pn.oid = p.pronamespace
WHERE t.tgrelid = %(table)s::regclass
  AND pn.nspname = %(store)s AND p.proname = 'capture_change'
  AND NOT t.tgisinternal
ORDER BY t.tgname

-- name: leader_lock
-- One drainer per queue: two would commit batches of the same row out of order.
SELECT pg_try_advisory_lock(hashtext('pgherald.trigger_queue:' || %(store)s))

-- name: set_wake
UPDATE {wake} SET armed = %(armed)s WHERE armed IS DISTINCT FROM %(armed)s

-- name: create_claim_stage
CREATE TEMP TABLE IF NOT EXISTS pgherald_claimed (LIKE {queue}) ON COMMIT DELETE ROWS

-- name: claim
-- Claim-and-delete: whatever is committed and still queued, oldest first. A sequence
-- value is taken before its transaction commits, so "ids above the last one seen" would
-- skip late committers; deleting what we move cannot. SKIP LOCKED keeps a second drainer
-- (there should be none: see leader_lock) from blocking. Only the watches the drainer
-- knows: a watch added while it runs keeps its rows queued until it learns of it.
WITH claimed AS (
    DELETE FROM {queue}
    WHERE id IN (
        SELECT id FROM {queue} WHERE watch = ANY(%(watches)s::text[])
        ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED
    )
    RETURNING *
)
INSERT INTO pg_temp.pgherald_claimed SELECT * FROM claimed

-- name: read_claimed
-- One watch's claimed rows with their values as PostgreSQL's text output (the form every
-- source stores), typed back through the table's row type. A row queued before a column
-- was added lacks its key in the jsonb: its keys are returned so it is not shown as NULL.
SELECT c.id, c.op, c.xid::text, c.xact_time, {commit_time},
       CASE WHEN c.old_row IS NULL OR c.old_row ?& %(columns)s::text[] THEN NULL
            ELSE ARRAY(SELECT jsonb_object_keys(c.old_row)) END,
       CASE WHEN c.new_row IS NULL OR c.new_row ?& %(columns)s::text[] THEN NULL
            ELSE ARRAY(SELECT jsonb_object_keys(c.new_row)) END,
       {old_values},
       {new_values}
FROM pg_temp.pgherald_claimed c
LEFT JOIN LATERAL jsonb_populate_record(NULL::{table}, c.old_row) o ON c.old_row IS NOT NULL
LEFT JOIN LATERAL jsonb_populate_record(NULL::{table}, c.new_row) n ON c.new_row IS NOT NULL
WHERE c.watch = %(watch)s
ORDER BY c.id

-- name: table_columns
-- The current columns of the watched tables, in table order.
SELECT t.schema_name, t.table_name, a.attname, a.atttypid::int
FROM unnest(%(schemas)s::text[], %(tables)s::text[]) AS t(schema_name, table_name)
JOIN pg_namespace n ON n.nspname = t.schema_name
JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.table_name
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY 1, 2, a.attnum

-- name: forget_watch
-- `watch remove`: what the watch queued and nobody moved yet goes with it.
DELETE FROM {queue} WHERE watch = %(watch)s

-- name: queue_depth
SELECT count(*), min(xact_time) FROM {queue}
