-- How far behind pgherald's replication slot is, and how much WAL it keeps
-- (ops/slot_stats.py). Each block starts with a `-- name: <name>` line.

-- name: slot_stats
-- One row for the slot, none when it does not exist. Positions are measured against
-- pg_current_wal_lsn(), so this runs on the primary. flush_lag is the walsender's own
-- measure (WAL written -> pgherald confirmed it stored it), there only while capture
-- streams; pg_stat_replication shows it to the slot's role and to pg_read_all_stats.
-- idle_seconds: from the caller's "capture last made progress" (NULL: unknown) to now,
-- by the server's clock, since that moment comes from the server's tables.
SELECT s.active,
       s.active_pid,
       s.wal_status,
       pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint AS retained_bytes,
       pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint AS lag_bytes,
       extract(epoch FROM r.flush_lag)::float8 AS flush_lag_seconds,
       s.safe_wal_size,
       s.confirmed_flush_lsn::text,
       s.restart_lsn::text,
       extract(epoch FROM now() - %(idle_since)s::timestamptz)::float8 AS idle_seconds
FROM pg_replication_slots s
LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
WHERE s.slot_name = %(slot)s

