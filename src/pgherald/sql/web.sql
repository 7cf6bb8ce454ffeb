-- Named queries of the web console (store/users.py, store/browse.py). Like queries.sql,
-- they run with search_path set to the store's schema, and values are parameters.

-- Users ---------------------------------------------------------------------------------

-- name: add_user
INSERT INTO web_users (name, password_hash, role)
VALUES (%(name)s, %(hash)s, %(role)s)
ON CONFLICT (name) DO NOTHING
RETURNING name

-- name: get_user
SELECT u.name, u.password_hash, u.role, u.session_generation, u.created_at, u.last_login_at,
       coalesce(array_agg(w.watch ORDER BY w.watch) FILTER (WHERE w.watch IS NOT NULL), '{}'),
       u.email
FROM web_users u
LEFT JOIN web_user_watches w ON w.user_name = u.name
WHERE u.name = %(name)s
GROUP BY u.name

-- name: list_users
SELECT u.name, u.password_hash, u.role, u.session_generation, u.created_at, u.last_login_at,
       coalesce(array_agg(w.watch ORDER BY w.watch) FILTER (WHERE w.watch IS NOT NULL), '{}'),
       u.email
FROM web_users u
LEFT JOIN web_user_watches w ON w.user_name = u.name
GROUP BY u.name
ORDER BY u.name

-- name: remove_user
DELETE FROM web_users WHERE name = %(name)s RETURNING role

-- name: set_role
UPDATE web_users SET role = %(role)s WHERE name = %(name)s RETURNING name

-- name: set_password
-- A new password ends the user's sessions: they carry the generation they were made in.
UPDATE web_users
SET password_hash = %(hash)s,
    session_generation = session_generation + CASE WHEN %(end_sessions)s THEN 1 ELSE 0 END
WHERE name = %(name)s
RETURNING name

-- name: end_sessions
UPDATE web_users SET session_generation = session_generation + 1
WHERE name = %(name)s
RETURNING name

-- name: record_login
UPDATE web_users SET last_login_at = now() WHERE name = %(name)s

-- name: count_admins
SELECT count(*) FROM web_users WHERE role = 'admin'

-- name: lock_users
-- Serialises changes that must keep one admin (removing one, demoting one).
SELECT pg_advisory_xact_lock(hashtext('pgherald.web_users:' || current_schema()))

-- name: clear_watches
DELETE FROM web_user_watches WHERE user_name = %(name)s

-- name: allow_watches
INSERT INTO web_user_watches (user_name, watch)
SELECT %(name)s, w FROM unnest(%(watches)s::text[]) AS w
ON CONFLICT DO NOTHING

-- name: deny_watches
DELETE FROM web_user_watches WHERE user_name = %(name)s AND watch = ANY (%(watches)s::text[])

-- name: set_email
UPDATE web_users SET email = %(email)s WHERE name = %(name)s RETURNING name

-- name: prune_own_subscriptions
-- A viewer's own sinks keep only the watches the viewer may still read: the other
-- subscriptions go, with what they delivered (a feed would still show it).
WITH gone AS (
    DELETE FROM subscriptions s
    USING sinks k, web_users u
    WHERE k.name = s.sink AND k.owner = u.name AND u.name = %(name)s AND u.role = 'viewer'
      AND NOT EXISTS (
          SELECT 1 FROM web_user_watches a WHERE a.user_name = u.name AND a.watch = s.watch)
    RETURNING s.sink, s.watch
)
DELETE FROM deliveries d
USING gone g, events e
WHERE d.sink = g.sink AND e.id = d.event_id AND e.watch = g.watch

-- name: get_secret
SELECT value FROM web_secrets WHERE name = %(name)s

-- name: put_secret
-- The first console to start stores its generated secret; later ones read that one.
INSERT INTO web_secrets (name, value) VALUES (%(name)s, %(value)s)
ON CONFLICT (name) DO NOTHING

-- Browsing the change log -------------------------------------------------------------------
-- Newest first, below a log id (keyset paging). Filters that no index serves (operation,
-- time, search) are applied to a bounded window of the log: `*_floor` finds the lowest log
-- id among the next `window` events that an index reaches, and the page is looked for
-- above it, so a request reads at most that many events however rare the matches are.

-- name: floor_all
SELECT count(*), min(id)
FROM (SELECT id FROM events WHERE id < %(before)s ORDER BY id DESC LIMIT %(window)s) AS w

-- name: floor_watches
-- One window per watch; the floor is the highest of the full windows' lowest ids (a
-- watch whose window is not full has no events below it). The bounds are written as row
-- comparisons on (watch, id), which only the (watch, id) index answers: with `watch =
-- u.name` the planner, not knowing the name, may walk the primary key instead and filter,
-- reading the whole log for a rare watch.
SELECT coalesce(max(f.low) FILTER (WHERE f.n = %(window)s), 0)
FROM unnest(%(watches)s::text[]) AS u(name)
CROSS JOIN LATERAL (
    SELECT count(*) AS n, min(id) AS low
    FROM (
        SELECT id FROM events
        WHERE (watch, id) < (u.name, %(before)s::bigint) AND (watch, id) >= (u.name, 0::bigint)
        ORDER BY watch DESC, id DESC
        LIMIT %(window)s
    ) AS w
) AS f

-- name: page_all
SELECT id, event_id, watch, op, schema_name, table_name, row_key, key_columns, shape_id,
       old_shape_id, old_values, new_values, unchanged, old_unchanged, changed, xid, position,
       commit_time, captured_at, method, seq, old_values_source, meta
FROM events e
WHERE e.id < %(before)s AND e.id >= %(floor)s
  AND (%(op)s::text IS NULL OR e.op = %(op)s::text)
  AND (%(since)s::timestamptz IS NULL OR coalesce(e.commit_time, e.captured_at) >= %(since)s)
  AND (%(until)s::timestamptz IS NULL OR coalesce(e.commit_time, e.captured_at) < %(until)s)
  AND (%(q)s::text IS NULL OR strpos(lower(concat_ws(' ', e.row_key,
          array_to_string(e.new_values, ' '), array_to_string(e.old_values, ' '))),
          lower(%(q)s::text)) > 0)
ORDER BY e.id DESC
LIMIT %(limit)s

-- name: page_watches
-- Each watch's newest matches through its (watch, id) index (row comparisons, as in
-- floor_watches), merged: never a sort of the whole log.
SELECT e.*
FROM unnest(%(watches)s::text[]) AS u(name)
CROSS JOIN LATERAL (
    SELECT id, event_id, watch, op, schema_name, table_name, row_key, key_columns, shape_id,
           old_shape_id, old_values, new_values, unchanged, old_unchanged, changed, xid,
           position, commit_time, captured_at, method, seq, old_values_source, meta
    FROM events e
    WHERE (e.watch, e.id) < (u.name, %(before)s::bigint)
      AND (e.watch, e.id) >= (u.name, %(floor)s::bigint)
      AND (%(op)s::text IS NULL OR e.op = %(op)s::text)
      AND (%(since)s::timestamptz IS NULL
           OR coalesce(e.commit_time, e.captured_at) >= %(since)s)
      AND (%(until)s::timestamptz IS NULL
           OR coalesce(e.commit_time, e.captured_at) < %(until)s)
      AND (%(q)s::text IS NULL OR strpos(lower(concat_ws(' ', e.row_key,
              array_to_string(e.new_values, ' '), array_to_string(e.old_values, ' '))),
              lower(%(q)s::text)) > 0)
    ORDER BY e.watch DESC, e.id DESC
    LIMIT %(limit)s
) AS e
ORDER BY e.id DESC
LIMIT %(limit)s

-- name: page_row
-- One row's history, through the (watch, row_key, id) index.
SELECT id, event_id, watch, op, schema_name, table_name, row_key, key_columns, shape_id,
       old_shape_id, old_values, new_values, unchanged, old_unchanged, changed, xid, position,
       commit_time, captured_at, method, seq, old_values_source, meta
FROM events e
WHERE e.watch = %(watch)s AND e.row_key = %(row_key)s AND e.id < %(before)s
  AND (%(op)s::text IS NULL OR e.op = %(op)s::text)
  AND (%(since)s::timestamptz IS NULL OR coalesce(e.commit_time, e.captured_at) >= %(since)s)
  AND (%(until)s::timestamptz IS NULL OR coalesce(e.commit_time, e.captured_at) < %(until)s)
  AND (%(q)s::text IS NULL OR strpos(lower(concat_ws(' ', e.row_key,
          array_to_string(e.new_values, ' '), array_to_string(e.old_values, ' '))),
          lower(%(q)s::text)) > 0)
ORDER BY e.id DESC
LIMIT %(limit)s

-- name: get_event
SELECT id, event_id, watch, op, schema_name, table_name, row_key, key_columns, shape_id,
       old_shape_id, old_values, new_values, unchanged, old_unchanged, changed, xid, position,
       commit_time, captured_at, method, seq, old_values_source, meta
FROM events
WHERE id = %(id)s

-- name: newer_all
-- Live updates: the matching events after a log id and up to another (the newest when the
-- reader woke up), oldest first, at most `limit` of them.
SELECT id, event_id, watch, op, schema_name, table_name, row_key, key_columns, shape_id,
       old_shape_id, old_values, new_values, unchanged, old_unchanged, changed, xid, position,
       commit_time, captured_at, method, seq, old_values_source, meta
FROM events e
WHERE e.id > %(after)s AND e.id <= %(upto)s
  AND (%(op)s::text IS NULL OR e.op = %(op)s::text)
  AND (%(since)s::timestamptz IS NULL OR coalesce(e.commit_time, e.captured_at) >= %(since)s)
  AND (%(until)s::timestamptz IS NULL OR coalesce(e.commit_time, e.captured_at) < %(until)s)
  AND (%(q)s::text IS NULL OR strpos(lower(concat_ws(' ', e.row_key,
          array_to_string(e.new_values, ' '), array_to_string(e.old_values, ' '))),
          lower(%(q)s::text)) > 0)
ORDER BY e.id
LIMIT %(limit)s

-- name: newer_watches
SELECT id, event_id, watch, op, schema_name, table_name, row_key, key_columns, shape_id,
       old_shape_id, old_values, new_values, unchanged, old_unchanged, changed, xid, position,
       commit_time, captured_at, method, seq, old_values_source, meta
FROM events e
WHERE e.watch = ANY (%(watches)s::text[]) AND e.id > %(after)s AND e.id <= %(upto)s
  AND (%(op)s::text IS NULL OR e.op = %(op)s::text)
  AND (%(since)s::timestamptz IS NULL OR coalesce(e.commit_time, e.captured_at) >= %(since)s)
  AND (%(until)s::timestamptz IS NULL OR coalesce(e.commit_time, e.captured_at) < %(until)s)
  AND (%(q)s::text IS NULL OR strpos(lower(concat_ws(' ', e.row_key,
          array_to_string(e.new_values, ' '), array_to_string(e.old_values, ' '))),
          lower(%(q)s::text)) > 0)
ORDER BY e.id
LIMIT %(limit)s

-- Dashboard -----------------------------------------------------------------------------

-- name: watch_activity
-- Per watch: errors in the last day, the newest change's time, and what waits in the
-- trigger queue (changes today: store/today.py).
WITH recent_errors AS (
    SELECT watch, count(*) AS n
    FROM errors
    WHERE occurred_at >= now() - interval '1 day'
    GROUP BY watch
),
queued AS (
    SELECT watch, count(*) AS n, min(xact_time) AS oldest
    FROM trigger_queue
    GROUP BY watch
)
SELECT w.name,
       coalesce(r.n, 0),
       (SELECT e.captured_at FROM events e WHERE e.watch = w.name ORDER BY e.id DESC LIMIT 1),
       coalesce(q.n, 0),
       q.oldest
FROM watches w
LEFT JOIN recent_errors r ON r.watch = w.name
LEFT JOIN queued q ON q.watch = w.name
WHERE %(watches)s::text[] IS NULL OR w.name = ANY (%(watches)s::text[])
ORDER BY w.name

-- name: today_position
-- The start of today in the server's time zone, the newest log id (every smaller one is
-- visible too: the append lock), and which database this is.
SELECT date_trunc('day', now()),
       coalesce((SELECT id FROM events ORDER BY id DESC LIMIT 1), 0),
       (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())

-- name: today_from_scratch
-- Events captured today up to a log id, by watch, through the captured_at index.
SELECT watch, count(*)
FROM events
WHERE captured_at >= %(day)s AND id <= %(upto)s
GROUP BY watch

-- name: today_since
-- Events captured today with log ids in (after, upto], by watch, through the primary key.
SELECT watch, count(*)
FROM events
WHERE id > %(after)s AND id <= %(upto)s AND captured_at >= %(day)s
GROUP BY watch

-- name: page_deliveries
SELECT d.id, d.event_id, e.event_id, e.watch, e.op, d.sink, d.status, d.attempts,
       d.next_attempt_at, d.last_error, d.delivered_at, d.created_at
FROM deliveries d JOIN events e ON e.id = d.event_id
WHERE d.id < %(before)s
  AND (%(sink)s::text IS NULL OR d.sink = %(sink)s)
  AND (%(status)s::text IS NULL OR d.status = %(status)s)
ORDER BY d.id DESC
LIMIT %(limit)s

-- Self-service: sinks a user owns, their subscriptions and deliveries ----------------------

-- name: own_sinks
SELECT name, kind, config, enabled, created_at FROM sinks WHERE owner = %(owner)s ORDER BY name

-- name: sink_owner
SELECT owner FROM sinks WHERE name = %(name)s

-- name: add_own_sink
INSERT INTO sinks (name, kind, config, owner)
VALUES (%(name)s, %(kind)s, %(config)s, %(owner)s)
ON CONFLICT (name) DO NOTHING
RETURNING name

-- name: own_subscriptions
SELECT s.sink, s.watch, k.kind, k.config, s.created_at
FROM subscriptions s JOIN sinks k ON k.name = s.sink
WHERE k.owner = %(owner)s
ORDER BY s.watch, s.sink

-- name: remove_own_subscription
DELETE FROM subscriptions s
USING sinks k
WHERE k.name = s.sink AND k.owner = %(owner)s AND s.sink = %(sink)s AND s.watch = %(watch)s
RETURNING s.id

-- name: set_own_email_recipients
-- The user's e-mail sinks follow their address.
UPDATE sinks SET config = jsonb_set(config, '{to}', to_jsonb(ARRAY[%(email)s::text]))
WHERE owner = %(owner)s AND kind = 'email'

-- name: page_own_deliveries
-- A user's own sinks' deliveries, newest first, of the watches they may read (NULL: all).
SELECT d.id, d.event_id, e.event_id, e.watch, e.op, d.sink, d.status, d.attempts,
       d.next_attempt_at, d.last_error, d.delivered_at, d.created_at
FROM deliveries d JOIN events e ON e.id = d.event_id
WHERE d.sink IN (SELECT name FROM sinks WHERE owner = %(owner)s)
  AND d.id < %(before)s
  AND (%(status)s::text IS NULL OR d.status = %(status)s)
  AND (%(watches)s::text[] IS NULL OR e.watch = ANY (%(watches)s::text[]))
ORDER BY d.id DESC
LIMIT %(limit)s

-- name: own_delivery_counts
SELECT d.sink, d.status, count(*)
FROM deliveries d
WHERE d.sink IN (SELECT name FROM sinks WHERE owner = %(owner)s)
GROUP BY 1, 2
ORDER BY 1, 2
