-- What `pgherald check`, the /metrics collector and /readyz read from the store
-- (ops/measure.py). Each block starts with a `-- name: <name>` line. Table names are
-- placeholders ({watches}, ...) filled with the store's schema-qualified identifiers;
-- values are parameters. Every query is cheap on a large store: it reads the small
-- tables, or a big one through an index.

-- name: statement_timeout
-- A bound on every statement of this session, so that a scrape or a check never hangs
-- on a lock or a slow server (milliseconds, as text).
SELECT set_config('statement_timeout', %(ms)s, false)

-- name: capture_progress
-- How many enabled logical watches there are, and when logical capture last made
-- progress as far as the store can tell: the checkpoint's last save, else (capture never
-- ran) the first logical watch's creation. Used for the lag in seconds while no process
-- streams from the slot (ops/slot_stats.py).
SELECT (SELECT count(*) FROM {watches} WHERE method = 'logical' AND enabled),
       coalesce(
           (SELECT updated_at FROM {checkpoints} WHERE source = %(checkpoint)s),
           (SELECT min(created_at) FROM {watches} WHERE method = 'logical' AND enabled)
       )

-- name: trigger_queue
-- Rows waiting in the trigger queue, and the age of the oldest (seconds, NULL if none).
SELECT count(*), extract(epoch FROM now() - min(xact_time))::float8 FROM {trigger_queue}

-- name: deliveries_by_sink
-- Each sink's deliveries that are not done, by status, and its dead letters: one index
-- lookup per sink and status (deliveries_sink_status_idx), never a scan of the delivered.
-- Each status is written as a constant: compared with a column of unnest(...), the
-- planner could not know which status it counts, guessed half of the table, and scanned
-- all of deliveries once per sink and status (320 ms a scrape at 240,000 deliveries).
SELECT s.name, v.status, v.n
FROM {sinks} s
CROSS JOIN LATERAL (VALUES
    ('pending', (SELECT count(*) FROM {deliveries} d
                 WHERE d.sink = s.name AND d.status = 'pending')),
    ('delivering', (SELECT count(*) FROM {deliveries} d
                    WHERE d.sink = s.name AND d.status = 'delivering')),
    ('failed', (SELECT count(*) FROM {deliveries} d
                WHERE d.sink = s.name AND d.status = 'failed')),
    ('dead', (SELECT count(*) FROM {deliveries} d
              WHERE d.sink = s.name AND d.status = 'dead'))
) AS v(status, n)
ORDER BY 1, 2

-- name: dead_since
-- Each sink's dead letters that died within the window: their last attempt (or, when
-- given up without one, their creation) is that recent. A dead letter put back in line
-- (`pgherald deliveries retry`) is not dead any more, and stops counting.
SELECT s.name,
       (SELECT count(*) FROM {deliveries} d
        WHERE d.sink = s.name AND d.status = 'dead'
          AND coalesce(
                  (SELECT max(a.attempted_at) FROM {delivery_attempts} a
                   WHERE a.delivery_id = d.id),
                  d.created_at
              ) > now() - %(window)s::interval)
FROM {sinks} s
ORDER BY 1

-- name: errors_since
-- Errors recorded within the window, and the latest one's watch and message.
SELECT count(*),
       (SELECT watch FROM {errors} WHERE occurred_at > now() - %(window)s::interval
        ORDER BY occurred_at DESC LIMIT 1),
       (SELECT message FROM {errors} WHERE occurred_at > now() - %(window)s::interval
        ORDER BY occurred_at DESC LIMIT 1)
FROM {errors}
WHERE occurred_at > now() - %(window)s::interval

-- name: snapshot_watches
-- Each enabled snapshot watch: its schedule options, and how long ago (seconds) it last
-- ran successfully and was created, by the server's clock; its last error, if the last
-- run failed.
SELECT name,
       options,
       extract(epoch FROM now() - last_success_at)::float8,
       extract(epoch FROM now() - created_at)::float8,
       last_error
FROM {watches}
WHERE method = 'snapshot' AND enabled
ORDER BY name
