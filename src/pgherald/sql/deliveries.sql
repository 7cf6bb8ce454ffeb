-- Named statements about deliveries (store/deliveries.py). They run with search_path set
-- to the store's schema, so names are unqualified.

-- name: ensure_sink
INSERT INTO sinks (name, kind, format, config)
VALUES (%(name)s, %(kind)s, 'pgherald', %(config)s)
ON CONFLICT (name) DO NOTHING

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
