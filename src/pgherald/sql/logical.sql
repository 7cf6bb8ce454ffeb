-- Queries of logical capture (sources/logical*.py) on the watched database.

-- name: chunk_columns
-- A watched table's columns for its initial snapshot: name, type, and the type a domain
-- is built on (its output function is the one that prints the value, as pgoutput does).
WITH RECURSIVE cols AS (
    SELECT a.attnum, a.attname, a.atttypid AS typid, a.atttypid AS base
    FROM pg_attribute a
    WHERE a.attrelid = (
        SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %s AND c.relname = %s
    )
    AND a.attnum > 0 AND NOT a.attisdropped
), resolved AS (
    SELECT attnum, attname, typid, base FROM cols
    UNION ALL
    SELECT r.attnum, r.attname, r.typid, t.typbasetype
    FROM resolved r JOIN pg_type t ON t.oid = r.base
    WHERE t.typtype = 'd'
)
SELECT DISTINCT ON (r.attnum) r.attname, r.typid::int8, r.base::int8
FROM resolved r JOIN pg_type t ON t.oid = r.base
WHERE t.typtype <> 'd'
ORDER BY r.attnum

-- name: slot_health
-- The slot's row whole (newer servers add columns: conflicting in 16, invalidation_reason
-- in 17), and how much WAL it holds back: retained from its restart_lsn (what the server
-- must keep), lag from its confirmed position (what pgherald has not acknowledged).
SELECT to_jsonb(s) AS slot,
       pg_wal_lsn_diff(w.lsn, s.restart_lsn)::int8 AS retained_bytes,
       pg_wal_lsn_diff(w.lsn, s.confirmed_flush_lsn)::int8 AS lag_bytes,
       w.lsn::text AS current_lsn
FROM pg_replication_slots s,
     LATERAL (
         SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
                     ELSE pg_current_wal_lsn() END AS lsn
     ) w
WHERE s.slot_name = %(slot)s

-- name: wal_keep_limit
-- max_slot_wal_keep_size in bytes (-1: unlimited); no row before PostgreSQL 13.
SELECT CASE WHEN setting::int8 < 0 THEN -1
            ELSE setting::int8 * CASE unit WHEN 'MB' THEN 1048576 WHEN 'kB' THEN 1024
                                           WHEN '8kB' THEN 8192 ELSE 1 END END
FROM pg_settings WHERE name = 'max_slot_wal_keep_size'

-- name: create_slot
-- A new slot for pgoutput: its consistent point, and the time it was reached (the slot is
-- created before the row's other columns are computed).
SELECT s.lsn::text, clock_timestamp()
FROM pg_create_logical_replication_slot(%(slot)s, 'pgoutput') s
