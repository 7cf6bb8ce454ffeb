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

-- name: leader_backend
-- The backend that holds the leader lock, as the claim checks that it is still there.
SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()

-- name: set_wake
-- The flag that shows whether the wake-up is armed (and that the trigger function of
-- migration 2 read at every row; migration 9's tries the lock below instead).
UPDATE {wake} SET armed = %(armed)s WHERE armed IS DISTINCT FROM %(armed)s

-- name: arm
-- The wake-up switch of capture_change (migration 9): the drainer holds this advisory
-- lock on its LISTEN connection while it sleeps, so a writer's shared try fails and it
-- sends the NOTIFY. The same key as the function's: hashtext of the store's name.
SELECT pg_try_advisory_lock(hashtext('pgherald.trigger_wake:' || %(store)s)::bigint)

-- name: disarm
SELECT pg_advisory_unlock(hashtext('pgherald.trigger_wake:' || %(store)s)::bigint)

-- name: create_claim_stage
CREATE TEMP TABLE IF NOT EXISTS pgherald_claimed (LIKE {queue}) ON COMMIT DELETE ROWS

-- name: claim
-- Claim-and-delete: whatever is committed and still queued, oldest first. A sequence
-- value is taken before its transaction commits, so "ids above the last one seen" would
-- skip late committers; deleting what we move cannot. SKIP LOCKED keeps a second drainer
-- (there should be none: see leader_lock) from blocking. Only the watches the drainer
-- knows: a watch added while it runs keeps its rows queued until it learns of it.
-- Returns, per watch that had rows: how many it took, the last queue id, whether every
-- row holds all of the watch's columns (complete_row: a row queued before a column was
-- added lacks it, and needs the shape it had, which only the Python path gives it), the
-- table's current columns and their types (so that a change of the table is noticed
-- without a query of its own), and whether the connection that holds the leader lock is
-- still there (its backend alive: a session's advisory lock lives as long as it does).
-- The drain's text output settings ride along (settings), local to the transaction.
WITH settings AS MATERIALIZED (
    SELECT {settings}
),
leader AS MATERIALIZED (
    SELECT count(*) AS alive
    FROM pg_stat_get_activity(%(leader_pid)s) AS a
    WHERE a.backend_start = %(leader_start)s
),
claimed AS (
    DELETE FROM {queue}
    WHERE id IN (
        SELECT id FROM {queue} WHERE watch = ANY({watches}::text[])
        ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED
    )
    RETURNING *
),
staged AS (
    INSERT INTO pg_temp.pgherald_claimed SELECT * FROM claimed
    RETURNING watch, id, old_row, new_row
),
taken AS (
    SELECT c.watch, count(*) AS n, max(c.id) AS last, bool_and({complete}) AS complete
    FROM staged c
    GROUP BY c.watch
),
current_columns AS (
    SELECT w.name,
           array_agg(a.attname::text ORDER BY a.attnum) AS names,
           array_agg(a.atttypid::int ORDER BY a.attnum) AS types
    FROM unnest({watches}::text[], {relations}::oid[]) AS w (name, relation)
    JOIN pg_attribute a ON a.attrelid = w.relation AND a.attnum > 0 AND NOT a.attisdropped
    WHERE w.name IN (SELECT watch FROM taken)
    GROUP BY w.name
)
SELECT t.watch, t.n, t.last, t.complete, cc.names, cc.types, l.alive
FROM taken t
LEFT JOIN current_columns cc ON cc.name = t.watch
CROSS JOIN leader l
CROSS JOIN settings

-- name: complete_row
-- One watch's part of the claim's check: its rows have every column it knows.
(c.watch = {watch}
 AND (c.old_row IS NULL OR c.old_row ?& {columns}::text[])
 AND (c.new_row IS NULL OR c.new_row ?& {columns}::text[]))

-- name: select_claimed_events
-- One watch's claimed rows as change log rows (the columns store/selected.py names), made
-- by the server as TriggerAssembler makes them in Python: the same event ids, keys, texts,
-- changed columns and meta. Only for rows that need nothing that Python alone knows: every
-- row holds all the watch's columns, and the watch's shape is the one of its last event.
-- An update that changed only ignored or unwatched columns is no event.
SELECT c.id AS ord,
       'T/' || c.xid::text || '/' || c.id::text AS event_id,
       {watch} AS watch,
       c.op,
       {schema_name} AS schema_name,
       {table_name} AS table_name,
       CASE WHEN c.op <> 'truncate' THEN {row_key} END AS row_key,
       CASE WHEN c.op <> 'truncate' THEN {key_columns} ELSE '{{}}'::text[] END AS key_columns,
       CASE WHEN c.op <> 'truncate' THEN {watch} END AS shape,
       v.old_values,
       v.new_values,
       d.changed,
       c.xid::text::bigint AS xid,
       c.id::text AS position,
       coalesce(t.committed, c.xact_time) AS commit_time,
       {captured_at} AS captured_at,
       'trigger' AS method,
       0 AS seq,
       CASE WHEN c.old_row IS NULL THEN 'none' ELSE 'trigger' END AS old_values_source,
       CASE WHEN t.committed IS NULL THEN '{{"commit_time": "transaction start"}}'::jsonb
            ELSE '{{}}'::jsonb END
       || CASE WHEN c.op = 'update' AND {old_key} IS DISTINCT FROM {new_key}
               THEN jsonb_build_object('old_key', {old_key_object})
               ELSE '{{}}'::jsonb END AS meta
FROM pg_temp.pgherald_claimed c
CROSS JOIN LATERAL (SELECT {commit_time} AS committed) t
LEFT JOIN LATERAL jsonb_populate_record(NULL::{table}, c.old_row) o ON c.old_row IS NOT NULL
LEFT JOIN LATERAL jsonb_populate_record(NULL::{table}, c.new_row) n ON c.new_row IS NOT NULL
CROSS JOIN LATERAL (
    SELECT CASE WHEN c.old_row IS NOT NULL THEN ARRAY[{old_values}]::text[] END AS old_values,
           CASE WHEN c.new_row IS NOT NULL THEN ARRAY[{new_values}]::text[] END AS new_values
) v
CROSS JOIN LATERAL (
    SELECT CASE WHEN c.op = 'update' THEN ARRAY(
               SELECT u.name
               FROM unnest({names}, v.old_values, v.new_values, {compared})
                    WITH ORDINALITY AS u (name, old, new, compared, i)
               WHERE u.compared AND u.old IS DISTINCT FROM u.new
               ORDER BY u.i
           ) ELSE '{{}}'::text[] END AS changed
) d
WHERE c.watch = {watch} AND (c.op <> 'update' OR cardinality(d.changed) > 0)

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
-- The current columns of the watched tables, in table order, with the table's oid.
SELECT t.schema_name, t.table_name, a.attname, a.atttypid::int, c.oid::bigint
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
