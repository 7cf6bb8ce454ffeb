-- Named statements of the digest job (store/digests.py, delivery/digests.py). They run with
-- search_path set to the store's schema, so names are unqualified.
--
-- A digest sink's deliveries stay open (pending, or failed and waiting for a retry) until
-- the digest that holds them is sent; the job then records them like the delivery engine
-- does. A change belongs to the period of its time (commit time, else capture time), or to
-- the period after the last one sent when it arrives late (%(until)s): nothing is lost.
-- With %(by_run)s, snapshot events are grouped per run instead and left out here.

-- name: try_lock
-- One digest job per sink at a time, across processes; held until the transaction ends.
SELECT pg_try_advisory_xact_lock(hashtext('pgherald.digest:' || %(schema)s || ':' || %(sink)s))

-- name: clock
SELECT clock_timestamp()

-- name: window_head
-- When the sink's oldest open change happened: its digest's period starts there.
SELECT min(greatest(coalesce(e.commit_time, e.captured_at), %(until)s::timestamptz))
FROM deliveries d
JOIN events e ON e.id = d.event_id
WHERE d.sink = %(sink)s
  AND d.status IN ('pending', 'failed')
  AND NOT (%(by_run)s AND e.method = 'snapshot')

-- name: window_state
-- How many open changes fall before %(end)s, and when the last of them may be tried.
SELECT count(*), max(d.next_attempt_at)
FROM deliveries d
JOIN events e ON e.id = d.event_id
WHERE d.sink = %(sink)s
  AND d.status IN ('pending', 'failed')
  AND NOT (%(by_run)s AND e.method = 'snapshot')
  AND greatest(coalesce(e.commit_time, e.captured_at), %(until)s::timestamptz) < %(end)s

-- name: unrouted_before
-- Whether the log holds changes for this sink's watches from before %(end)s that the router
-- has not looked at yet (then the period is not complete).
SELECT EXISTS (
    SELECT FROM subscriptions s
    JOIN events e ON e.watch = s.watch AND e.id > s.from_event
    WHERE s.sink = %(sink)s
      AND e.id > coalesce(
          (SELECT position::bigint FROM checkpoints WHERE source = %(router)s), 0)
      AND coalesce(e.commit_time, e.captured_at) < %(end)s
      AND NOT (%(by_run)s AND e.method = 'snapshot')
)

-- name: lock_window
-- The open changes of the period, locked until the digest's outcome is recorded. NOWAIT:
-- rows locked by someone else (a hand-made retry or discard) are tried on the next pass,
-- rather than making a digest of part of them or waiting while holding the sink's lock.
SELECT d.id, d.attempts
FROM deliveries d
JOIN events e ON e.id = d.event_id
WHERE d.sink = %(sink)s
  AND d.status IN ('pending', 'failed')
  AND NOT (%(by_run)s AND e.method = 'snapshot')
  AND greatest(coalesce(e.commit_time, e.captured_at), %(until)s::timestamptz) < %(end)s
ORDER BY d.id
FOR UPDATE OF d NOWAIT

-- name: open_runs
-- A run sink's open changes of snapshot runs, per run, with the run (if still recorded).
WITH open AS (
    SELECT e.watch, e.position, count(*) AS n, max(d.next_attempt_at) AS next_at,
           min(d.id) AS first_delivery
    FROM deliveries d
    JOIN events e ON e.id = d.event_id
    WHERE d.sink = %(sink)s
      AND d.status IN ('pending', 'failed')
      AND e.method = 'snapshot'
    GROUP BY e.watch, e.position
)
SELECT o.watch, o.position, o.n, o.next_at, o.first_delivery,
       r.id, r.status, r.started_at, r.ended_at, r.error
FROM open o
LEFT JOIN runs r ON r.id = CASE WHEN o.position ~ '^[0-9]{1,18}$' THEN o.position::bigint END
ORDER BY o.first_delivery

-- name: unrouted_run
-- Whether some of a run's events are still to be routed.
SELECT EXISTS (
    SELECT FROM events e
    WHERE e.watch = %(watch)s
      AND e.id > coalesce(
          (SELECT position::bigint FROM checkpoints WHERE source = %(router)s), 0)
      AND e.method = 'snapshot'
      AND e.position = %(position)s
)

-- name: lock_run
SELECT d.id, d.attempts
FROM deliveries d
JOIN events e ON e.id = d.event_id
WHERE d.sink = %(sink)s
  AND d.status IN ('pending', 'failed')
  AND e.method = 'snapshot'
  AND e.watch = %(watch)s
  AND e.position = %(position)s
ORDER BY d.id
FOR UPDATE OF d NOWAIT

-- name: finished_runs
-- Snapshot runs of the sink's watches that started after it subscribed and that the sink
-- has not looked at yet (%(marks)s: the last run seen per watch), oldest first.
SELECT r.id, r.watch, r.status, r.started_at, r.ended_at, r.error,
       r.inserts + r.updates + r.deletes + r.truncates
FROM runs r
JOIN subscriptions s ON s.watch = r.watch AND s.sink = %(sink)s
WHERE r.source = 'snapshot'
  AND r.started_at >= s.created_at
  AND r.id > coalesce((%(marks)s::jsonb ->> r.watch)::bigint, 0)
ORDER BY r.id
LIMIT 1000

-- name: run_deliveries
-- The sink's deliveries of one run's events: open ones, all ones.
SELECT count(*) FILTER (WHERE d.status IN ('pending', 'failed', 'delivering')), count(*)
FROM events e
JOIN deliveries d ON d.event_id = e.id AND d.sink = %(sink)s
WHERE e.watch = %(watch)s
  AND e.method = 'snapshot'
  AND e.position = %(position)s

-- name: digest_counts
SELECT e.watch, e.op, count(*)
FROM deliveries d
JOIN events e ON e.id = d.event_id
WHERE d.id = ANY(%(ids)s)
GROUP BY e.watch, e.op

-- name: digest_events
-- The listed changes of a digest, in log order, with the columns ChangeLog.stored_events reads.
SELECT e.id, e.event_id, e.watch, e.op, e.schema_name, e.table_name, e.row_key,
       e.key_columns, e.shape_id, e.old_shape_id, e.old_values, e.new_values, e.unchanged,
       e.old_unchanged, e.changed, e.xid, e.position, e.commit_time, e.captured_at, e.method,
       e.seq, e.old_values_source, e.meta
FROM deliveries d
JOIN events e ON e.id = d.event_id
WHERE d.id = ANY(%(ids)s)
ORDER BY e.id

-- name: subscribed_watches
SELECT watch FROM subscriptions WHERE sink = %(sink)s ORDER BY watch
