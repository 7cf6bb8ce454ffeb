-- Reading the change log for people: feeds, watch, run and row pages (store/history.py).
-- Event columns are those of read_events (queries.sql), in its order, so that
-- ChangeLog.stored_events reads them. Run with search_path set to the store's schema.

-- name: feed_events
-- A feed sink's delivered events, newest first, a page before a log id (keyset paging on
-- deliveries_delivered_idx).
SELECT e.id, e.event_id, e.watch, e.op, e.schema_name, e.table_name, e.row_key, e.key_columns,
       e.shape_id, e.old_shape_id, e.old_values, e.new_values, e.unchanged, e.old_unchanged,
       e.changed, e.xid, e.position, e.commit_time, e.captured_at, e.method, e.seq,
       e.old_values_source, e.meta
FROM deliveries d
JOIN events e ON e.id = d.event_id
WHERE d.sink = %(sink)s
  AND d.status = 'delivered'
  AND d.event_id < %(before)s
ORDER BY d.event_id DESC
LIMIT %(limit)s

-- name: watch_events_newest
SELECT id, event_id, watch, op, schema_name, table_name, row_key, key_columns, shape_id,
       old_shape_id, old_values, new_values, unchanged, old_unchanged, changed, xid, position,
       commit_time, captured_at, method, seq, old_values_source, meta
FROM events
WHERE watch = %(watch)s
  AND id < %(before)s
ORDER BY id DESC
LIMIT %(limit)s

-- name: row_events_newest
-- One row's history (events_watch_row_key_idx).
SELECT id, event_id, watch, op, schema_name, table_name, row_key, key_columns, shape_id,
       old_shape_id, old_values, new_values, unchanged, old_unchanged, changed, xid, position,
       commit_time, captured_at, method, seq, old_values_source, meta
FROM events
WHERE watch = %(watch)s
  AND row_key = %(row_key)s
  AND id < %(before)s
ORDER BY id DESC
LIMIT %(limit)s

-- name: run_events
-- A snapshot run's events in log order (events_snapshot_run_idx).
SELECT id, event_id, watch, op, schema_name, table_name, row_key, key_columns, shape_id,
       old_shape_id, old_values, new_values, unchanged, old_unchanged, changed, xid, position,
       commit_time, captured_at, method, seq, old_values_source, meta
FROM events
WHERE watch = %(watch)s
  AND method = 'snapshot'
  AND position = %(position)s
  AND id > %(after)s
ORDER BY id
LIMIT %(limit)s

-- name: run_event_count
SELECT count(*) FROM events
WHERE watch = %(watch)s AND method = 'snapshot' AND position = %(position)s

-- name: get_run
SELECT id, watch, source, started_at, ended_at, status, inserts, updates, deletes, truncates,
       rows_compared, error
FROM runs
WHERE id = %(id)s

-- name: watch_rows
-- The rows with events among a watch's newest ones (what a static export writes pages for).
SELECT DISTINCT row_key
FROM (SELECT row_key FROM events WHERE watch = %(watch)s ORDER BY id DESC LIMIT %(limit)s) e
WHERE row_key IS NOT NULL

-- name: set_feed_token
-- A feed sink's token, replaced (rotate) or only set where it has none (fill).
UPDATE sinks
SET config = config || jsonb_build_object('token', %(token)s::text)
WHERE name = %(name)s
  AND kind = 'feed'
  AND (%(replace)s OR coalesce(config ->> 'token', '') = '')
RETURNING name

-- name: set_watch_display
-- A watch's display options (an empty object removes them).
UPDATE watches
SET options = CASE WHEN %(display)s::jsonb = '{}'::jsonb THEN options - 'display'
                   ELSE options || jsonb_build_object('display', %(display)s::jsonb) END
WHERE name = %(name)s
RETURNING name
