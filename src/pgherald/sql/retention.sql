-- Pruning the change log by age (store/retention.py). Every statement works on one watch
-- and a bounded number of rows, found by index order, in a short transaction of its own:
-- nothing here takes a lock that capture, routing or delivery wait for (events are only
-- appended, and the deliveries touched are finished ones, which nobody updates).
-- Run with the store's schema as search_path. The caller composes {match} (which watch's
-- rows) and {action} (delete, or count for a dry run) into prune_runs and prune_errors.

-- name: prune_lock
-- One pruner per store at a time (the daemon's job, `pgherald prune`): a session lock,
-- released when the pass ends or the connection does.
SELECT pg_try_advisory_lock(hashtext('pgherald.prune:' || current_schema()))

-- name: prune_unlock
SELECT pg_advisory_unlock(hashtext('pgherald.prune:' || current_schema()))

-- name: prune_settings
-- A pass's transactions give way rather than wait: a lock held elsewhere for longer than
-- this ends the pass with an error (the next one goes on), it never queues writers.
SELECT set_config('lock_timeout', '5s', false)

-- name: clock
SELECT now()

-- name: logged_watches
-- Every watch name the log, the runs or the errors hold, registered or not (a removed
-- watch's events stay until the default retention prunes them). A loose index scan per
-- table: a few index probes per name, not a scan of the log.
WITH RECURSIVE
ev AS (
    SELECT (SELECT min(watch) FROM events) AS watch
    UNION ALL
    SELECT (SELECT min(e.watch) FROM events e WHERE e.watch > ev.watch)
    FROM ev WHERE ev.watch IS NOT NULL
),
ru AS (
    SELECT (SELECT min(watch) FROM runs) AS watch
    UNION ALL
    SELECT (SELECT min(r.watch) FROM runs r WHERE r.watch > ru.watch)
    FROM ru WHERE ru.watch IS NOT NULL
),
er AS (
    SELECT (SELECT min(watch) FROM errors) AS watch
    UNION ALL
    SELECT (SELECT min(x.watch) FROM errors x WHERE x.watch > er.watch)
    FROM er WHERE er.watch IS NOT NULL
)
SELECT watch FROM ev WHERE watch IS NOT NULL
UNION
SELECT watch FROM ru WHERE watch IS NOT NULL
UNION
SELECT watch FROM er WHERE watch IS NOT NULL
ORDER BY 1

-- name: routing_limit
-- How far pruning may go in a watch's log: up to the router's checkpoint when a
-- subscription may still want its events (an event not routed yet has no delivery yet,
-- open or not); anywhere (NULL) otherwise.
SELECT CASE
    WHEN EXISTS (SELECT FROM subscriptions s WHERE s.watch = %(watch)s)
    THEN coalesce((SELECT position::bigint FROM checkpoints WHERE source = %(router)s), 0)
END

-- name: shape_keepers
-- The events that ChangeLog.last_shape reads for a watch (query last_watch_shape): its
-- latest stored full row and a later schema event. Capture seeds each watch's row shape
-- from them at start, so they are kept whatever their age.
WITH full_row AS (
    SELECT e.id
    FROM events e
    WHERE e.watch = %(watch)s
      AND e.op IN ('insert', 'update', 'delete', 'read') AND e.old_shape_id IS NULL
      AND e.shape_id IS NOT NULL
      AND (e.op <> 'delete' OR e.old_values_source <> 'none')
    ORDER BY e.id DESC
    LIMIT 1
)
SELECT id FROM full_row
UNION ALL
SELECT e.id
FROM events e
WHERE e.watch = %(watch)s AND e.op = 'schema' AND e.meta ? 'type_oids_after'
  AND e.id > coalesce((SELECT id FROM full_row), 0)
ORDER BY 1 DESC
LIMIT 2

-- name: prune_candidates
-- The next `limit` events of a watch in log order after `after` (up to `upto`), each with
-- whether it is younger than the cutoff and, for the older ones, why it may have to stay:
-- an open delivery, or (`keep_newest`) being the newest version of its row, which is
-- what ChangeLog.append reads to complete an update from the log (fill_from_log and
-- fill_key_changes look up the latest event of the same watch and row_key whose op is
-- insert, update, delete or read). Pruning stops at the first young event.
WITH batch AS (
    SELECT e.id, e.op, e.row_key, e.captured_at
    FROM events e
    WHERE e.watch = %(watch)s AND e.id > %(after)s AND e.id <= %(upto)s
    ORDER BY e.id
    LIMIT %(limit)s
)
SELECT b.id,
       b.op,
       b.row_key,
       b.captured_at >= %(cutoff)s AS young,
       CASE WHEN b.captured_at < %(cutoff)s THEN EXISTS (
           SELECT FROM deliveries d
           WHERE d.event_id = b.id AND d.status IN ('pending', 'delivering', 'failed')
       ) END AS open,
       CASE WHEN b.captured_at < %(cutoff)s AND %(keep_newest)s AND b.row_key IS NOT NULL
                 AND b.op IN ('insert', 'update', 'delete', 'read')
            THEN NOT EXISTS (
                SELECT FROM events n
                WHERE n.watch = %(watch)s AND n.row_key = b.row_key AND n.id > b.id
                  AND n.op IN ('insert', 'update', 'delete', 'read')
            )
            ELSE false END AS newest
FROM batch b
ORDER BY b.id

-- name: prunable_last_deletes
-- Of the rows whose newest version is a delete (ids and row keys given), those that may
-- go with all their history: nothing looks back past a delete (it ends the row's life in
-- fill_from_log and fill_key_changes), so a row that is gone needs nothing in the log,
-- provided no older version of it stays behind to be taken for its latest one. Older
-- versions stay only for an open delivery or as a shape keeper (they are older than the
-- cutoff and not the newest), which is what is checked, so the answer is the same
-- whether the older versions are already pruned or are about to be (a dry run).
SELECT d.id
FROM unnest(%(ids)s::bigint[], %(row_keys)s::text[]) AS d(id, row_key)
WHERE NOT EXISTS (
    SELECT FROM events o
    WHERE o.watch = %(watch)s AND o.row_key = d.row_key AND o.id < d.id
      AND (o.id = ANY (%(keep)s::bigint[])
           OR EXISTS (SELECT FROM deliveries x
                      WHERE x.event_id = o.id AND x.status IN ('pending', 'delivering', 'failed')))
)

-- name: lock_finished_deliveries
-- Holds the finished deliveries of the events about to go, so that none is reopened (a
-- dead letter retried by hand) between the check below and the delete. A delivery
-- reopened before this is skipped here and seen as open by doomed_events.
SELECT d.id
FROM deliveries d
WHERE d.event_id = ANY (%(ids)s::bigint[]) AND d.status IN ('delivered', 'dead')
ORDER BY d.id
FOR UPDATE

-- name: doomed_events
-- Of the events about to go, those without an open delivery now (after the lock above).
SELECT e.id
FROM events e
WHERE e.id = ANY (%(ids)s::bigint[])
  AND NOT EXISTS (SELECT FROM deliveries d
                  WHERE d.event_id = e.id AND d.status IN ('pending', 'delivering', 'failed'))

-- name: count_events
-- What deleting these events takes with it (delete_events; a dry run's answer).
SELECT count(*),
       (SELECT count(*) FROM event_fields f WHERE f.event_id = ANY (%(ids)s::bigint[])),
       (SELECT count(*) FROM deliveries d WHERE d.event_id = ANY (%(ids)s::bigint[])),
       (SELECT count(*) FROM delivery_attempts a JOIN deliveries d ON d.id = a.delivery_id
        WHERE d.event_id = ANY (%(ids)s::bigint[]))
FROM events e
WHERE e.id = ANY (%(ids)s::bigint[])

-- name: delete_events
-- The events go, and with them their field rows and deliveries (they have no foreign keys
-- to events: migration 11), each found by the index that leads with event_id; the
-- deliveries' attempts go by their key's cascade.
WITH fields AS (
    DELETE FROM event_fields WHERE event_id = ANY (%(ids)s::bigint[])
), sent AS (
    DELETE FROM deliveries WHERE event_id = ANY (%(ids)s::bigint[])
)
DELETE FROM events WHERE id = ANY (%(ids)s::bigint[])

-- name: count_unrouted
-- Events older than the cutoff that wait for the router (after `after`).
SELECT count(*) FROM events e
WHERE e.watch = %(watch)s AND e.id > %(after)s AND e.captured_at < %(cutoff)s

-- name: prune_runs
-- A watch's runs (or those of whole sources: `match` is composed by the caller, a test of
-- the watch's name or "r.watch IS NULL") that started before the cutoff, are over,
-- are not the latest, and whose changes (snapshot events, positioned by run id) are all
-- gone from the log: a digest or a page may still ask for the run of a change it shows.
-- {staying} is "true" when pruning (the events that are left stay), and in a dry run, the
-- test of whether an event would stay: younger than the cutoff, an open delivery, a keeper.
WITH doomed AS (
    SELECT r.id
    FROM runs r
    WHERE {match}
      AND r.started_at < %(cutoff)s
      AND r.status <> 'running'
      AND r.id < (SELECT max(r.id) FROM runs r WHERE {match})
      AND NOT EXISTS (SELECT FROM events e
                      WHERE e.watch = r.watch AND e.method = 'snapshot'
                        AND e.position = r.id::text AND {staying})
    ORDER BY r.started_at
    LIMIT %(limit)s
)
{action}

-- name: prune_errors
-- A watch's errors (or those of no watch, as in prune_runs) from before the cutoff,
-- oldest first.
WITH doomed AS (
    SELECT x.id
    FROM errors x
    WHERE {match} AND x.occurred_at < %(cutoff)s
    ORDER BY x.occurred_at
    LIMIT %(limit)s
)
{action}
