-- Named statements about deliveries (store/deliveries.py). They run with search_path set
-- to the store's schema, so names are unqualified.

-- name: ensure_sink
INSERT INTO sinks (name, kind, format, config)
VALUES (%(name)s, %(kind)s, 'pgherald', %(config)s)
ON CONFLICT (name) DO NOTHING
RETURNING name

-- name: record_outcome
-- One delivery of one event to one sink, as it ended; a later outcome replaces it.
INSERT INTO deliveries (event_id, sink, status, attempts, last_error, delivered_at)
VALUES (%(event_id)s, %(sink)s, %(status)s, %(attempts)s, %(error)s,
        CASE WHEN %(status)s = 'delivered' THEN now() END)
ON CONFLICT (event_id, sink) DO UPDATE
SET status = excluded.status,
    attempts = deliveries.attempts + excluded.attempts,
    last_error = excluded.last_error,
    delivered_at = excluded.delivered_at

-- name: list_deliveries
SELECT d.event_id, d.sink, d.status, d.attempts, d.last_error
FROM deliveries d
WHERE %(sink)s::text IS NULL OR d.sink = %(sink)s
ORDER BY d.id

-- name: add_sink
INSERT INTO sinks (name, kind, format, config, strictly_ordered, max_attempts)
VALUES (%(name)s, %(kind)s, %(format)s, %(config)s, %(strictly_ordered)s, %(max_attempts)s)
ON CONFLICT (name) DO NOTHING
RETURNING name

-- name: list_sinks
SELECT name, kind, format, config, strictly_ordered, max_attempts, enabled, created_at
FROM sinks
ORDER BY name

-- name: remove_sink
DELETE FROM sinks WHERE name = %(name)s RETURNING name

-- name: update_sink
-- A sink's definition changed (a configuration reload); its deliveries stay as they are.
UPDATE sinks
SET kind = %(kind)s, format = %(format)s, config = %(config)s,
    strictly_ordered = %(strictly_ordered)s, max_attempts = %(max_attempts)s,
    enabled = %(enabled)s
WHERE name = %(name)s
RETURNING name

-- name: subscribe
INSERT INTO subscriptions (sink, watch, filter, ignore_columns, from_event)
VALUES (%(sink)s, %(watch)s, %(filter)s, %(ignore_columns)s,
        (SELECT coalesce(max(id), 0) FROM events))
ON CONFLICT (sink, watch) DO UPDATE
SET filter = excluded.filter, ignore_columns = excluded.ignore_columns
RETURNING id

-- name: unsubscribe
DELETE FROM subscriptions WHERE sink = %(sink)s AND watch = %(watch)s RETURNING id

-- name: list_subscriptions
SELECT s.id, s.sink, s.watch, s.filter, s.ignore_columns, k.strictly_ordered, k.enabled,
       s.from_event
FROM subscriptions s JOIN sinks k ON k.name = s.sink
ORDER BY s.sink, s.watch

-- name: insert_deliveries
-- The router's output: one row per (event, sink); a replayed routing batch is harmless.
INSERT INTO deliveries (event_id, sink, order_key)
SELECT * FROM unnest(%(events)s::bigint[], %(sinks)s::text[], %(keys)s::text[])
ON CONFLICT (event_id, sink) DO NOTHING

-- name: routing_events
-- What the router needs of events when no subscription tests row values: the log id, the
-- watch, the operation, the key and the changed columns (not the rows, which cost most to
-- read and decode).
SELECT id, watch, op, row_key, key_columns, changed
FROM events
WHERE id > %(after_id)s
ORDER BY id
LIMIT %(limit)s

-- name: claim_deliveries
-- A sink's next due deliveries in log order, locked for this transaction (a worker that
-- dies lets go of them at once), each only if no earlier delivery of its row is still
-- open: one row's events go out in log order, also across retries and workers.
-- That test is a scalar subquery with LIMIT 1, not NOT EXISTS: the planner turns NOT EXISTS
-- into an anti join, and on a freshly filled table (no statistics yet) it scanned all of a
-- sink's open deliveries once per candidate (4 s for a claim of 500 behind 20,000); the
-- subquery is always one probe of deliveries_order_idx per candidate.
-- The deliveries are chosen and locked first (a materialized CTE), and only those few are
-- joined to their events: joined in one query, the prepared statement's generic plan, made
-- when statistics said few deliveries were open, scanned all of events once per open
-- delivery under the lock (137 s for the last few hundred of 20,000 with two workers, the
-- other worker waiting for the rows it held).
WITH claimed AS MATERIALIZED (
    SELECT d.id, d.attempts, d.event_id
    FROM deliveries d
    WHERE d.sink = %(sink)s
      AND d.status IN ('pending', 'failed')
      AND d.next_attempt_at <= now()
      AND (SELECT o.id FROM deliveries o
           WHERE o.sink = d.sink AND o.order_key = d.order_key AND o.id < d.id
             AND o.status IN ('pending', 'failed', 'delivering')
           LIMIT 1) IS NULL
    ORDER BY d.id
    LIMIT %(limit)s
    FOR UPDATE OF d SKIP LOCKED
)
SELECT c.id, c.attempts,
       e.id, e.event_id, e.watch, e.op, e.schema_name, e.table_name, e.row_key,
       e.key_columns, e.shape_id, e.old_shape_id, e.old_values, e.new_values, e.unchanged,
       e.old_unchanged, e.changed, e.xid, e.position, e.commit_time, e.captured_at, e.method,
       e.seq, e.old_values_source, e.meta
FROM claimed c
JOIN events e ON e.id = c.event_id
ORDER BY c.id

-- name: claim_strict
-- A strictly ordered sink: the oldest open deliveries in log order, if the oldest is due
-- (chosen and locked first, then joined to their events: see claim_deliveries).
WITH claimed AS MATERIALIZED (
    SELECT d.id, d.attempts, d.event_id
    FROM deliveries d
    WHERE d.sink = %(sink)s
      AND d.status IN ('pending', 'failed')
      AND (SELECT min(next_attempt_at) <= now() FROM (
              SELECT next_attempt_at FROM deliveries
              WHERE sink = %(sink)s AND status IN ('pending', 'failed') ORDER BY id LIMIT 1) h)
    ORDER BY d.id
    LIMIT %(limit)s
    FOR UPDATE OF d
)
SELECT c.id, c.attempts,
       e.id, e.event_id, e.watch, e.op, e.schema_name, e.table_name, e.row_key,
       e.key_columns, e.shape_id, e.old_shape_id, e.old_values, e.new_values, e.unchanged,
       e.old_unchanged, e.changed, e.xid, e.position, e.commit_time, e.captured_at, e.method,
       e.seq, e.old_values_source, e.meta
FROM claimed c
JOIN events e ON e.id = c.event_id
ORDER BY c.id

-- name: due_sinks
-- Which of these sinks a claim would find work for now (the claims' own conditions, for
-- one delivery): the delivery engine's look at its idle sinks, which hold no connection
-- and otherwise wake on the router's NOTIFY. A sink without open deliveries costs one
-- probe of deliveries_claim_idx.
SELECT s.name
FROM unnest(%(sinks)s::text[], %(strict)s::boolean[]) AS s(name, strict)
WHERE CASE WHEN s.strict THEN
        (SELECT h.next_attempt_at <= now() FROM deliveries h
         WHERE h.sink = s.name AND h.status IN ('pending', 'failed')
         ORDER BY h.id LIMIT 1)
      ELSE EXISTS (
        SELECT 1 FROM deliveries d
        WHERE d.sink = s.name
          AND d.status IN ('pending', 'failed')
          AND d.next_attempt_at <= now()
          AND (SELECT o.id FROM deliveries o
               WHERE o.sink = d.sink AND o.order_key = d.order_key AND o.id < d.id
                 AND o.status IN ('pending', 'failed', 'delivering')
               LIMIT 1) IS NULL)
      END

-- name: next_due
-- Seconds until the sink's next open delivery that is not due yet falls due (NULL: none):
-- when a sink that goes idle should look again by itself.
SELECT extract(epoch FROM min(next_attempt_at) - now())::float8
FROM deliveries
WHERE sink = %(sink)s
  AND status IN ('pending', 'failed')
  AND next_attempt_at > now()

-- name: record_deliveries
-- The outcomes of a batch: status, attempts, next attempt, error; and one attempt row each.
WITH outcome AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(statuses)s::text[], %(delays)s::float8[],
                         %(errors)s::text[]) AS o(id, status, delay, error)
), updated AS (
    UPDATE deliveries d
    SET status = o.status,
        attempts = d.attempts + 1,
        next_attempt_at = now() + make_interval(secs => o.delay),
        last_error = o.error,
        delivered_at = CASE WHEN o.status = 'delivered' THEN now() END
    FROM outcome o
    WHERE d.id = o.id
    RETURNING d.id
)
INSERT INTO delivery_attempts (delivery_id, outcome, error)
SELECT o.id, CASE o.status WHEN 'delivered' THEN 'delivered' WHEN 'dead' THEN 'dead'
                           ELSE 'retry' END, o.error
FROM outcome o

-- name: deliveries_listing
SELECT d.id, d.event_id, e.event_id, e.watch, e.op, d.sink, d.status, d.attempts,
       d.next_attempt_at, d.last_error, d.delivered_at, d.created_at
FROM deliveries d JOIN events e ON e.id = d.event_id
WHERE (%(sink)s::text IS NULL OR d.sink = %(sink)s)
  AND (%(status)s::text IS NULL OR d.status = %(status)s)
ORDER BY d.id DESC
LIMIT %(limit)s

-- name: retry_deliveries
UPDATE deliveries
SET status = 'pending', next_attempt_at = now(), attempts = 0
WHERE status IN ('dead', 'failed')
  AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s))
  AND (%(sink)s::text IS NULL OR sink = %(sink)s)
RETURNING id, sink

-- name: discard_deliveries
UPDATE deliveries
SET status = 'dead', last_error = coalesce(last_error || '; ', '') || 'discarded by hand'
WHERE status IN ('pending', 'failed')
  AND id = ANY(%(ids)s)
RETURNING id

-- name: delivery_counts
SELECT sink, status, count(*) FROM deliveries GROUP BY sink, status ORDER BY sink, status
