-- Named statements of snapshot comparison (sources/snapshot.py). Names in {braces} are
-- composed with psycopg.sql ({query} is the watch's own SQL, as configured); statements
-- that embed the watch's query take no parameters, so a % in it is only a %.

-- name: probe
-- The result's columns, without running the query to its end.
SELECT * FROM ({query}) AS q LIMIT 0

-- name: current
-- The result, restricted to the compared columns (ignored ones left out).
(SELECT {columns} FROM ({query}) AS q)

-- name: baseline_columns
-- A domain's column as its base type (a domain of a domain: down to the base), which is
-- what a result's description says; else every run of a domain column saw a retyped column.
WITH RECURSIVE col AS (
    SELECT a.attnum, a.attname, a.atttypid AS typ
    FROM pg_attribute a
    JOIN pg_class c ON c.oid = a.attrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = %(store)s AND c.relname = %(table)s AND a.attnum > 0
      AND NOT a.attisdropped
    UNION ALL
    SELECT col.attnum, col.attname, t.typbasetype
    FROM col JOIN pg_type t ON t.oid = col.typ
    WHERE t.typtype = 'd'
)
SELECT col.attname, col.typ::int
FROM col JOIN pg_type t ON t.oid = col.typ
WHERE t.typtype <> 'd'
ORDER BY col.attnum

-- name: baseline_persistence
-- 'u' for an UNLOGGED baseline (what runs create), 'p' for one an older pgherald made.
SELECT c.relpersistence
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(store)s AND c.relname = %(table)s

-- name: baseline_has_rows
-- Whether the baseline holds any row: one tuple read. Crash recovery empties an UNLOGGED
-- table whole, never in part, so this tells a lost baseline from a kept one.
SELECT EXISTS (SELECT FROM {baseline})

-- name: unlog_baseline
-- A baseline an older pgherald made (logged) becomes UNLOGGED, once: the table is
-- rewritten without WAL, and its runs stop writing WAL for it from then on.
ALTER TABLE {baseline} SET UNLOGGED

-- name: count_rows
SELECT count(*) FROM {current} c

-- name: check_keys
-- One pass: how many rows, and up to ten keys that are NULL or not unique. The groups are
-- aggregated as they come (no CTE to materialise), and only the offenders' keys are
-- turned into text (FILTER is tested before the aggregate's argument is computed).
SELECT coalesce(sum(g.n), 0)::bigint,
       (array_agg(ARRAY[{key_texts}] || g.n::text) FILTER (WHERE g.n > 1 OR g.has_null))[1:10]
FROM (SELECT {keys}, count(*) AS n, bool_or({any_null}) AS has_null
      FROM {current} c
      GROUP BY {group}) g

-- name: key_guaranteed
-- Whether the watched table guarantees that the key identifies one row: all key columns
-- NOT NULL, and a valid unique index (not partial, no expressions) whose key columns are
-- all key columns of the watch; not a table with inheritance children (a SELECT of the
-- parent reads theirs too), but a partitioned one (its unique indexes hold across the
-- partitions). Read under the run's snapshot, so an index newer than it does not count.
SELECT count(*) = cardinality(%(keys)s::text[])
       AND bool_and(a.attnotnull)
       AND EXISTS (
           SELECT 1
           FROM pg_index i
           WHERE i.indrelid = c.oid AND i.indisunique AND i.indisvalid
             AND i.indpred IS NULL AND i.indexprs IS NULL
             AND NOT EXISTS (
                 SELECT 1
                 FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
                 JOIN pg_attribute ia ON ia.attrelid = c.oid AND ia.attnum = k.attnum
                 WHERE k.ord <= i.indnkeyatts AND ia.attname <> ALL (%(keys)s::text[])))
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                   AND a.attname = ANY (%(keys)s::text[])
WHERE n.nspname = %(schema)s AND c.relname = %(table)s
  AND (c.relkind IN ('p', 'm') OR (c.relkind = 'r' AND NOT c.relhassubclass))
GROUP BY c.oid

-- name: create_baseline
-- UNLOGGED: a run rewrites a few rows on nearly every page of the baseline and its
-- index, which would write each page whole to the WAL after every checkpoint (124 MB
-- of WAL per run of 1,000,000 rows, 21 MB unlogged). A crash empties it; the run after
-- notices (SnapshotComparer.run) and records the baseline again.
CREATE UNLOGGED TABLE {table} AS SELECT * FROM {current} c

-- name: keyed_diff
-- The rows that differ, matched on the key: absent on one side, or some compared column
-- distinct (NULL = NULL is no change). Old values as text for the events, old keys and
-- new values typed for applying the difference to the baseline.
CREATE TEMP TABLE pgherald_diff ON COMMIT DROP AS
SELECT CASE WHEN {b_key} IS NULL THEN 'insert'
            WHEN {c_key} IS NULL THEN 'delete'
            ELSE 'update' END AS op,
       array_remove(ARRAY[{changed}]::text[], NULL) AS changed,
       {old_keys},
       {b_ctid} AS b_ctid,
       {old_values},
       {new_values}
FROM {baseline} b
FULL JOIN {current} c ON {join}
WHERE {b_key} IS NULL OR {c_key} IS NULL OR {any_differs}

-- name: read_diff
SELECT op, changed, {old_texts}, {new_texts} FROM pg_temp.pgherald_diff ORDER BY {order}

-- name: count_diff
SELECT op, count(*) FROM pg_temp.pgherald_diff GROUP BY op

-- name: sort_in_memory
-- For the rest of the run's transaction, whose last statement makes the events: it sorts
-- the differences twice (by key, to number them; by number, to give them ids in that
-- order), a few MB for 20,000 differences, which the default work_mem (4MB) sends to disk.
SELECT set_config('work_mem', '64MB', true)

-- name: diff_events
-- The differences as change log rows (the columns that store/selected.py names), made by
-- the server as _EventMaker.diff makes them in Python: the same event ids (S/<run>/<n>,
-- numbered in read_diff's order), keys, texts and changed columns, so that a run stores
-- the same log whichever makes them. Only when the shape did not change: old and new rows
-- then share the one shape, labelled 'row'.
SELECT d.seq AS ord,
       'S/' || %(run)s::text || '/' || d.seq::text AS event_id,
       %(watch)s::text AS watch,
       d.op,
       %(schema_name)s::text AS schema_name,
       %(table_name)s::text AS table_name,
       '[' || {row_key} || ']' AS row_key,
       %(key_columns)s::text[] AS key_columns,
       'row' AS shape,
       CASE WHEN d.op <> 'insert' THEN ARRAY[{old_texts}]::text[] END AS old_values,
       CASE WHEN d.op <> 'delete' THEN ARRAY[{new_texts}]::text[] END AS new_values,
       CASE WHEN d.op = 'update' THEN d.changed ELSE '{{}}'::text[] END AS changed,
       pg_current_xact_id()::text::bigint AS xid,
       %(run)s::text AS position,
       %(captured_at)s::timestamptz AS commit_time,
       %(captured_at)s::timestamptz AS captured_at,
       'snapshot' AS method,
       d.seq::integer AS seq,
       CASE WHEN d.op <> 'insert' THEN 'snapshot' ELSE 'none' END AS old_values_source,
       '{{}}'::jsonb AS meta
FROM (SELECT p.*, row_number() OVER (ORDER BY {order}) AS seq FROM pg_temp.pgherald_diff p) d

-- name: read_baseline
SELECT {base_texts} FROM {baseline} ORDER BY {order}

-- name: apply_deletes
-- Updates are applied as delete + insert: the baseline takes the whole new row. The rows
-- go by the ctid the comparison saw (a TID scan: no join with the baseline, no index);
-- nothing else changes the baseline while the run holds the watch's lock, and tuples
-- keep their ctid within the transaction.
DELETE FROM {baseline}
WHERE ctid = ANY (ARRAY(SELECT b_ctid FROM pg_temp.pgherald_diff WHERE op <> 'insert'))

-- name: apply_inserts
INSERT INTO {baseline} ({columns}) SELECT {values} FROM pg_temp.pgherald_diff WHERE op <> 'delete'

-- name: multiset_diff
-- Without a key: rows are compared by content, as a multiset (n > 0: more copies now,
-- n < 0: fewer), on the texts of the shared columns.
CREATE TEMP TABLE pgherald_diff ON COMMIT DROP AS
SELECT {texts}, sum(x.n)::bigint AS n
FROM (SELECT {b_texts}, -1 AS n FROM {baseline} b
      UNION ALL
      SELECT {c_texts}, 1 FROM {current} c) x
GROUP BY {group}
HAVING sum(x.n) <> 0

-- name: read_multiset
SELECT * FROM pg_temp.pgherald_diff ORDER BY n
