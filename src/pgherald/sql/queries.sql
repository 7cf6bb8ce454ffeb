-- Named queries of the store. Each block starts with a `-- name: <name>` line and runs
-- with search_path set to the store's schema (store/session.py), so names are
-- unqualified; the change log's staging tables live in pg_temp.
-- Values are always parameters (%(name)s); a literal percent sign would need doubling.

-- Search path ----------------------------------------------------------------------

-- name: enter_schema
-- SET LOCAL search_path, remembering the caller's path so that it can be put back before
-- we hand the transaction back: the caller's own unqualified names keep working.
-- The schema placeholder is filled by psycopg.sql.Identifier; simple protocol, no parameters.
SELECT set_config('pgherald.saved_search_path', current_setting('search_path'), true);
SET LOCAL search_path TO {schema};

-- name: restore_search_path
SELECT set_config('search_path', current_setting('pgherald.saved_search_path'), true)

-- Migrations -----------------------------------------------------------------------

-- name: version_table_exists
SELECT EXISTS (
    SELECT 1
    FROM pg_catalog.pg_class c
    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = %(schema)s AND c.relname = 'schema_version' AND c.relkind = 'r'
)

-- name: migration_lock
-- One migrator per store schema at a time; held until the transaction ends.
SELECT pg_advisory_xact_lock(hashtextextended('pgherald.migrate/' || %(schema)s, 0))

-- name: current_version
SELECT max(version) FROM schema_version

-- name: record_version
INSERT INTO schema_version (version) VALUES (%(version)s)

-- Change log: append --------------------------------------------------------------

-- name: append_lock
-- Appenders take turns, each until its transaction ends, so that events.id (a sequence)
-- becomes visible in order: a reader that tails with `id > last_seen` never sees an id
-- while a lower one is still to commit. Keyed on the store's schema (the search path is
-- the store's when this runs), so separate stores in one database do not wait for each
-- other. Anything else that inserts into events must take it too.
SELECT pg_advisory_xact_lock(hashtext('pgherald.changelog:' || current_schema()))

-- name: notify_appended
-- Wakes tailing readers when the transaction commits (LISTEN on the channel that
-- changelog.changes_channel names): the payload is the highest id in the log, which under
-- append_lock is the highest this transaction appended, every lower one being visible.
SELECT pg_notify(%(channel)s, max(id)::text) FROM events HAVING max(id) IS NOT NULL

-- name: create_stage
-- The staging table that COPY fills. Temporary, so every connection has its own;
-- ON COMMIT DELETE ROWS empties it cheaply, the DELETE covers two appends in one
-- transaction. IF NOT EXISTS: a rolled-back first append takes the table with it.
-- The batch's statements are planned for thousands of rows but run in well under a second:
-- JIT compilation would cost more than it saves, and the sorts of old-value filling want
-- more than the default work_mem. Both are put back with the search path.
SELECT set_config('pgherald.saved_jit', current_setting('jit'), true),
       set_config('pgherald.saved_work_mem', current_setting('work_mem'), true);
SET LOCAL jit = off;
SET LOCAL work_mem = '64MB';
CREATE TEMP TABLE IF NOT EXISTS pgherald_stage (
    ord integer NOT NULL,
    event_id text NOT NULL,
    watch text NOT NULL,
    op text NOT NULL,
    schema_name text NOT NULL,
    table_name text NOT NULL,
    row_key text,
    key_columns text[] NOT NULL,
    shape_digest text,
    old_shape_digest text,
    old_values text[],
    new_values text[],
    unchanged text[],
    old_unchanged text[],
    changed text[],
    xid bigint,
    position text NOT NULL,
    commit_time timestamptz,
    captured_at timestamptz NOT NULL,
    method text NOT NULL,
    seq integer NOT NULL,
    old_values_source text NOT NULL,
    meta jsonb NOT NULL,
    fill boolean NOT NULL,
    old_row_key text  -- an update that moved its row to another key: the key it had
) ON COMMIT DELETE ROWS;
DELETE FROM pg_temp.pgherald_stage;

-- name: finish_append
SELECT set_config('jit', current_setting('pgherald.saved_jit'), true),
       set_config('work_mem', current_setting('pgherald.saved_work_mem'), true),
       set_config('search_path', current_setting('pgherald.saved_search_path'), true)

-- name: copy_stage
COPY pg_temp.pgherald_stage (
    ord, event_id, watch, op, schema_name, table_name, row_key, key_columns, shape_digest,
    old_shape_digest, old_values, new_values, unchanged, old_unchanged, changed, xid, position,
    commit_time, captured_at, method, seq, old_values_source, meta, fill, old_row_key
) FROM STDIN

-- name: upsert_shapes
-- DO NOTHING writes nothing for a known shape; a shape that another transaction is
-- inserting right now is waited for, so the next statement finds it by digest.
INSERT INTO shapes (digest, columns, names)
SELECT u.digest, u.columns,
       ARRAY(SELECT c.col ->> 0
             FROM jsonb_array_elements(u.columns) WITH ORDINALITY AS c(col, i)
             ORDER BY c.i)
FROM unnest(%(digests)s::text[], %(columns)s::jsonb[]) AS u(digest, columns)
ON CONFLICT (digest) DO NOTHING

-- name: fill_key_changes
-- Completes the unchanged TOAST values of updates that moved their row to another key,
-- from the row's history under the key it had (`old_row_key`, pgoutput's old key tuple):
-- each such column's latest known text among the versions of (watch, old_row_key) before
-- the update, staged or the latest stored one, within the row's life there (after the
-- last delete of that key; from the last update that moved a row to it). A version that
-- left the column as unchanged TOAST had the same value as the one before it. What is
-- not found stays unchanged TOAST. An update may move a row that an earlier update of the
-- same batch moved, whose values this very statement completes: ChangeLog runs it once
-- per such link of the batch's longest chain, before fill_from_log, which then carries
-- the completed values on to later updates under the new key.
WITH requests AS (
    SELECT st.ord, st.watch, st.old_row_key, u.name
    FROM pg_temp.pgherald_stage st
    CROSS JOIN LATERAL unnest(st.unchanged) AS u(name)
    WHERE st.op = 'update' AND st.old_row_key IS NOT NULL AND st.unchanged IS NOT NULL
),
keys AS (
    SELECT DISTINCT watch, old_row_key AS row_key FROM requests
),
versions AS (
    SELECT v.watch, v.row_key, v.ord, v.op, s.names, v.new_values AS vals,
           v.unchanged AS unch, v.old_row_key IS NOT NULL AS moved_here
    FROM pg_temp.pgherald_stage v
    JOIN keys k ON k.watch = v.watch AND k.row_key = v.row_key
    LEFT JOIN shapes s ON s.digest = v.shape_digest
    WHERE v.op IN ('insert', 'update', 'delete', 'read')
    UNION ALL
    SELECT k.watch, k.row_key, -1, p.op, s.names, p.new_values, p.unchanged, false
    FROM keys k
    CROSS JOIN LATERAL (
        SELECT e.op, e.shape_id, e.new_values, e.unchanged
        FROM events e
        WHERE e.watch = k.watch AND e.row_key = k.row_key
          AND e.op IN ('insert', 'update', 'delete', 'read')
          AND e.event_id NOT IN (SELECT event_id FROM pg_temp.pgherald_stage)
        ORDER BY e.id DESC
        LIMIT 1
    ) AS p
    LEFT JOIN shapes s ON s.id = p.shape_id
),
found AS (
    SELECT r.ord, r.name, c.val
    FROM requests r
    CROSS JOIN LATERAL (
        SELECT coalesce(max(CASE WHEN v.op = 'delete' THEN v.ord + 1
                                 WHEN v.moved_here THEN v.ord END), -1) AS start
        FROM versions v
        WHERE v.watch = r.watch AND v.row_key = r.old_row_key AND v.ord < r.ord
    ) AS life
    CROSS JOIN LATERAL (
        SELECT v.vals[array_position(v.names, r.name)] AS val
        FROM versions v
        WHERE v.watch = r.watch AND v.row_key = r.old_row_key
          AND v.ord < r.ord AND v.ord >= life.start AND v.op <> 'delete'
          AND r.name = ANY (v.names) AND NOT (r.name = ANY (coalesce(v.unch, '{}')))
        ORDER BY v.ord DESC
        LIMIT 1
    ) AS c
),
filled AS (
    SELECT st.ord,
           array_agg(CASE WHEN f.name IS NULL THEN c.val ELSE f.val END ORDER BY c.i)
               AS new_values,
           array_agg(c.name ORDER BY c.i)
               FILTER (WHERE f.name IS NULL AND c.name = ANY (st.unchanged)) AS unchanged
    FROM pg_temp.pgherald_stage st
    JOIN shapes s ON s.digest = st.shape_digest
    CROSS JOIN LATERAL unnest(s.names, st.new_values) WITH ORDINALITY AS c(name, val, i)
    LEFT JOIN found f ON f.ord = st.ord AND f.name = c.name
    WHERE st.ord IN (SELECT ord FROM found)
    GROUP BY st.ord
)
UPDATE pg_temp.pgherald_stage st
SET new_values = f.new_values, unchanged = f.unchanged
FROM filled f
WHERE st.ord = f.ord

-- name: fill_from_log
-- Completes the staged updates marked `fill` (no old row, or unchanged TOAST values) from
-- the previous version of the same row: the previous staged event of the same
-- (watch, row_key), else the latest stored one. A delete ends a row's life, so nothing
-- looks back past one, and an update that moved a row to this key starts a new one (what
-- the key held before belonged to another row; fill_key_changes has completed it already). A column's previous text is the latest *known* text of that column
-- in the row's life: a version that left it as unchanged TOAST had it from an earlier
-- version, so the latest known one is the same value (and if none is known, none was).
-- Works column by column, as rows of (row, life, column, version) ordered by version,
-- where a window carries the latest known version forward to the requests.
WITH targets AS (  -- the rows to look at, numbered: sorting by integers beats texts
    SELECT d.watch, d.row_key, row_number() OVER () AS gid
    FROM (SELECT DISTINCT watch, row_key FROM pg_temp.pgherald_stage WHERE fill) AS d
),
stored AS (
    SELECT t.gid, -1 AS ord, p.op, s.names, p.new_values AS vals, p.unchanged AS unch,
           false AS fill, false AS moved_here
    FROM targets t
    CROSS JOIN LATERAL (
        SELECT e.op, e.shape_id, e.new_values, e.unchanged
        FROM events e
        WHERE e.watch = t.watch AND e.row_key = t.row_key
          AND e.op IN ('insert', 'update', 'delete', 'read')
          AND e.event_id NOT IN (SELECT event_id FROM pg_temp.pgherald_stage)
        ORDER BY e.id DESC
        LIMIT 1
    ) AS p
    LEFT JOIN shapes s ON s.id = p.shape_id
),
versions AS (
    SELECT * FROM stored
    UNION ALL
    SELECT t.gid, st.ord, st.op, s.names, st.new_values, st.unchanged, st.fill,
           st.old_row_key IS NOT NULL
    FROM pg_temp.pgherald_stage st
    JOIN targets t ON t.watch = st.watch AND t.row_key = st.row_key
    LEFT JOIN shapes s ON s.digest = st.shape_digest
    WHERE st.op IN ('insert', 'update', 'delete', 'read')
),
lives AS (
    SELECT v.*,
           count(*) FILTER (WHERE v.op = 'delete' OR v.moved_here)
               OVER (PARTITION BY v.gid ORDER BY v.ord) AS life
    FROM versions v
),
flagged AS (
    SELECT l.*,
           count(*) FILTER (WHERE l.op <> 'delete')
               OVER (PARTITION BY l.gid, l.life ORDER BY l.ord
                     ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) > 0 AS has_prev
    FROM lives l
),
stream AS (
    SELECT f.gid, f.life, f.ord, c.name COLLATE "C" AS name, 1 AS kind, c.val
    FROM flagged f
    CROSS JOIN LATERAL unnest(f.names, f.vals) AS c(name, val)
    WHERE f.op <> 'delete' AND f.vals IS NOT NULL
      AND NOT (c.name = ANY (coalesce(f.unch, '{}')))
    UNION ALL
    SELECT f.gid, f.life, f.ord, c.name COLLATE "C", 0 AS kind, NULL
    FROM flagged f
    CROSS JOIN LATERAL unnest(f.names) AS c(name)
    WHERE f.fill AND f.has_prev
),
carried AS (
    SELECT s.*,
           max(s.ord) FILTER (WHERE s.kind = 1)
               OVER (PARTITION BY s.gid, s.life, s.name ORDER BY s.ord, s.kind) AS src
    FROM stream s
),
prev AS (
    SELECT r.ord, r.name, v.val, r.src IS NOT NULL AS known
    FROM carried r
    LEFT JOIN carried v
      ON v.kind = 1 AND v.gid = r.gid AND v.life = r.life AND v.name = r.name AND v.ord = r.src
    WHERE r.kind = 0
),
cols AS (
    SELECT st.ord, c.i, c.name, p.val AS prev_val,
           coalesce(p.known, false) AS known,
           c.name = ANY (coalesce(st.unchanged, '{}')) AS was_unchanged,
           c.name = ANY (coalesce(w.ignore_columns, '{}')) AS ignored,
           CASE WHEN c.name = ANY (coalesce(st.unchanged, '{}')) AND coalesce(p.known, false)
                THEN p.val ELSE c.val END AS new_val
    FROM pg_temp.pgherald_stage st
    JOIN shapes s ON s.digest = st.shape_digest
    LEFT JOIN watches w ON w.name = st.watch  -- its --ignore-columns are no change
    CROSS JOIN LATERAL unnest(s.names, st.new_values) WITH ORDINALITY AS c(name, val, i)
    LEFT JOIN prev p ON p.ord = st.ord AND p.name = c.name COLLATE "C"
    WHERE st.fill
),
filled AS (
    SELECT c.ord,
           array_agg(c.new_val ORDER BY c.i) AS new_values,
           array_agg(c.prev_val ORDER BY c.i) AS prev_values,
           array_agg(c.name ORDER BY c.i)
               FILTER (WHERE c.was_unchanged AND NOT c.known) AS unchanged,
           array_agg(c.name ORDER BY c.i) FILTER (WHERE NOT c.known) AS prev_unknown,
           array_agg(c.name ORDER BY c.i)
               FILTER (WHERE c.known AND NOT c.ignored
                       AND c.new_val IS DISTINCT FROM c.prev_val) AS changed,
           bool_or(c.was_unchanged AND c.known) AS filled_new
    FROM cols c
    GROUP BY c.ord
),
targets_prev AS (
    SELECT f.ord, f.has_prev FROM flagged f WHERE f.ord >= 0
)
UPDATE pg_temp.pgherald_stage st
SET new_values = f.new_values,
    unchanged = f.unchanged,
    old_values = CASE WHEN st.old_values IS NULL AND h.has_prev
                      THEN f.prev_values ELSE st.old_values END,
    old_unchanged = CASE WHEN st.old_values IS NULL AND h.has_prev
                         THEN f.prev_unknown ELSE st.old_unchanged END,
    changed = CASE WHEN st.old_values IS NULL AND h.has_prev
                   THEN coalesce(f.changed, '{}') ELSE st.changed END,
    old_values_source = CASE WHEN (st.old_values IS NULL AND h.has_prev) OR f.filled_new
                             THEN 'change_log' ELSE st.old_values_source END
FROM filled f
JOIN targets_prev h ON h.ord = f.ord
WHERE st.ord = f.ord

-- name: insert_events
-- One INSERT ... SELECT for the whole batch, in batch order (so ids follow it); a replayed
-- event_id is skipped, and since field rows are made from what was inserted, so are its
-- fields. An update whose old row was completed from the log, wholly known, and that
-- changed no watched column (only ignored ones, or none) is no change to report, as when
-- the replica identity sends the old row. Returns how many events were new.
WITH inserted AS (
    INSERT INTO events (
        event_id, watch, op, schema_name, table_name, row_key, key_columns, shape_id,
        old_shape_id, old_values, new_values, unchanged, old_unchanged, changed, xid, position,
        commit_time, captured_at, method, seq, old_values_source, meta
    )
    SELECT st.event_id, st.watch, st.op, st.schema_name, st.table_name, st.row_key,
           st.key_columns, s.id, os.id, st.old_values, st.new_values, st.unchanged,
           st.old_unchanged, st.changed, st.xid, st.position, st.commit_time, st.captured_at,
           st.method, st.seq, st.old_values_source, st.meta
    FROM pg_temp.pgherald_stage st
    LEFT JOIN shapes s ON s.digest = st.shape_digest
    LEFT JOIN shapes os ON os.digest = st.old_shape_digest
    WHERE NOT (st.op = 'update' AND st.fill AND st.old_values IS NOT NULL
               AND coalesce(cardinality(st.changed), 0) = 0
               AND coalesce(cardinality(st.old_unchanged), 0) = 0)
    ORDER BY st.ord
    ON CONFLICT (event_id) DO NOTHING
    RETURNING id, op, shape_id, old_shape_id, old_values, new_values, changed
),
fields AS (
    INSERT INTO event_fields (event_id, column_name, old_value, new_value)
    SELECT DISTINCT ON (i.id, c.name)
           i.id, c.name,
           i.old_values[array_position(coalesce(os.names, s.names), c.name)],
           i.new_values[array_position(s.names, c.name)]
    FROM inserted i
    JOIN shapes s ON s.id = i.shape_id
    LEFT JOIN shapes os ON os.id = i.old_shape_id
    CROSS JOIN LATERAL unnest(i.changed) AS c(name)
    WHERE i.op = 'update'
    RETURNING 1
)
SELECT count(*) FROM inserted

-- name: save_search_path
-- With set_search_path, what enter_schema does, as two single statements that can go in a
-- pipeline with what follows (the schema's quoted name is a parameter): one round trip.
SELECT set_config('pgherald.saved_search_path', current_setting('search_path'), true)

-- name: set_search_path
SELECT set_config('search_path', %(path)s, true)

-- name: direct_begin
-- The direct path (see ChangeLog.append): events that are new by construction are COPYed
-- straight into `events`, inside a savepoint so that a duplicate can fall back.
SAVEPOINT pgherald_append

-- name: shape_ids
SELECT digest, id FROM shapes WHERE digest = ANY (%(digests)s::text[])

-- name: copy_events
COPY events (
    event_id, watch, op, schema_name, table_name, row_key, key_columns, shape_id,
    old_shape_id, old_values, new_values, unchanged, old_unchanged, changed, xid, position,
    commit_time, captured_at, method, seq, old_values_source, meta
) FROM STDIN

-- name: reserve_event_ids
-- The log ids of a direct batch whose updates have field rows, which must name their
-- event's id: taken from the log's own sequence under the append lock, so they follow
-- the ids before them as COPY's defaults would have (a rolled-back batch leaves a gap,
-- as any rolled-back insert does).
SELECT nextval(q.seq)
FROM (SELECT pg_get_serial_sequence('events', 'id')::regclass AS seq) AS q,
     generate_series(1, %(n)s::integer)

-- name: copy_events_with_ids
COPY events (
    id, event_id, watch, op, schema_name, table_name, row_key, key_columns, shape_id,
    old_shape_id, old_values, new_values, unchanged, old_unchanged, changed, xid, position,
    commit_time, captured_at, method, seq, old_values_source, meta
) FROM STDIN

-- name: insert_event_fields
-- The field rows of a direct batch's updates, made by ChangeLog as insert_events makes
-- them from the stored rows (each changed column's old and new text), sent as arrays in
-- the pipeline that ends the append: no round trip of their own.
INSERT INTO event_fields (event_id, column_name, old_value, new_value)
SELECT *
FROM unnest(%(ids)s::bigint[], %(names)s::text[], %(olds)s::text[], %(news)s::text[])

-- name: direct_end
-- Sent in a pipeline with restore_search_path (and the caller's statements); a COMMIT
-- that ends the pipeline releases the savepoint itself.
RELEASE SAVEPOINT pgherald_append

-- name: direct_undo
-- A duplicate event_id: forget the COPY and the search path, the staged path follows.
ROLLBACK TO SAVEPOINT pgherald_append;
RELEASE SAVEPOINT pgherald_append;
SELECT set_config('search_path', current_setting('pgherald.saved_search_path'), true);

-- Change log: reading --------------------------------------------------------------

-- name: read_events
SELECT id, event_id, watch, op, schema_name, table_name, row_key, key_columns, shape_id,
       old_shape_id, old_values, new_values, unchanged, old_unchanged, changed, xid, position,
       commit_time, captured_at, method, seq, old_values_source, meta
FROM events
WHERE id > %(after_id)s
  AND (%(op)s::text IS NULL OR op = %(op)s::text)
ORDER BY id
LIMIT %(limit)s

-- name: read_watch_events
SELECT id, event_id, watch, op, schema_name, table_name, row_key, key_columns, shape_id,
       old_shape_id, old_values, new_values, unchanged, old_unchanged, changed, xid, position,
       commit_time, captured_at, method, seq, old_values_source, meta
FROM events
WHERE watch = %(watch)s
  AND id > %(after_id)s
  AND (%(op)s::text IS NULL OR op = %(op)s::text)
ORDER BY id
LIMIT %(limit)s

-- name: get_shapes
SELECT id, columns FROM shapes WHERE id = ANY (%(ids)s::integer[])

-- name: last_event_id
SELECT coalesce(max(id), 0) FROM events

-- name: find_event_id
SELECT id FROM events WHERE event_id = %(event_id)s

-- name: last_watch_shape
-- A watch's latest known shape: that of its latest stored full row (a delete's key-only
-- image is not one), or the shape recorded by a later schema event (whose transaction may
-- have stored no full row: a key-only delete, a truncate). Schema events are looked for
-- only after that row, so this reads a few index entries, not the watch's whole history.
WITH full_row AS (
    SELECT e.id, s.columns
    FROM events e
    JOIN shapes s ON s.id = e.shape_id
    WHERE e.watch = %(watch)s
      AND e.op IN ('insert', 'update', 'delete', 'read') AND e.old_shape_id IS NULL
      AND (e.op <> 'delete' OR e.old_values_source <> 'none')
    ORDER BY e.id DESC
    LIMIT 1
),
schema_change AS (
    SELECT e.id,
           (SELECT jsonb_agg(jsonb_build_array(c.col -> 0, o.oid, c.col -> 1) ORDER BY c.i)
            FROM jsonb_array_elements(e.meta -> 'columns_after') WITH ORDINALITY AS c(col, i)
            JOIN jsonb_array_elements(e.meta -> 'type_oids_after') WITH ORDINALITY AS o(oid, i)
              USING (i)) AS columns
    FROM events e
    WHERE e.watch = %(watch)s AND e.op = 'schema' AND e.meta ? 'type_oids_after'
      AND e.id > coalesce((SELECT id FROM full_row), 0)
    ORDER BY e.id DESC
    LIMIT 1
)
SELECT columns FROM (SELECT * FROM full_row UNION ALL SELECT * FROM schema_change) AS latest
ORDER BY id DESC
LIMIT 1

-- Checkpoints ----------------------------------------------------------------------

-- name: load_checkpoint
SELECT position FROM checkpoints WHERE source = %(source)s

-- name: save_checkpoint
INSERT INTO checkpoints (source, position, updated_at)
VALUES (%(source)s, %(position)s, now())
ON CONFLICT (source) DO UPDATE SET position = EXCLUDED.position, updated_at = EXCLUDED.updated_at

-- name: delete_checkpoint
DELETE FROM checkpoints WHERE source = %(source)s

-- name: last_commit_time
-- The newest event of each watch (by log order, on the (watch, id) index), latest commit.
SELECT max(e.commit_time)
FROM unnest(%(watches)s::text[]) AS w (name)
CROSS JOIN LATERAL (
    SELECT commit_time FROM events WHERE watch = w.name ORDER BY id DESC LIMIT 1
) e

-- Watches --------------------------------------------------------------------------

-- name: insert_watch
INSERT INTO watches (
    name, schema_name, table_name, method, key_columns, columns, ignore_columns, query,
    options, enabled, status, retain
)
VALUES (
    %(name)s, %(schema_name)s, %(table_name)s, %(method)s, %(key_columns)s, %(columns)s,
    %(ignore_columns)s, %(query)s, %(options)s, %(enabled)s, %(status)s, %(retain)s
)
ON CONFLICT (name) DO NOTHING
RETURNING name

-- name: list_watches
SELECT name, schema_name, table_name, method, key_columns, columns, ignore_columns, query,
       options, enabled, created_at, last_run_at, last_success_at, last_error, changes_seen,
       status, retain
FROM watches
ORDER BY name

-- name: get_watch
SELECT name, schema_name, table_name, method, key_columns, columns, ignore_columns, query,
       options, enabled, created_at, last_run_at, last_success_at, last_error, changes_seen,
       status, retain
FROM watches
WHERE name = %(name)s

-- name: delete_watch
DELETE FROM watches WHERE name = %(name)s RETURNING name

-- name: set_watch_enabled
UPDATE watches
SET enabled = %(enabled)s,
    status = CASE WHEN %(enabled)s THEN (CASE WHEN status = 'disabled' THEN 'new' ELSE status END)
                  ELSE 'disabled' END
WHERE name = %(name)s
RETURNING name

-- name: set_watch_retain
UPDATE watches SET retain = %(retain)s WHERE name = %(name)s RETURNING name

-- name: record_watch_activity
UPDATE watches
SET last_run_at = now(),
    last_success_at = CASE WHEN %(ok)s THEN now() ELSE last_success_at END,
    last_error = CASE WHEN %(ok)s THEN NULL ELSE %(error)s END,
    changes_seen = changes_seen + %(changes)s,
    status = CASE WHEN NOT enabled THEN 'disabled' WHEN %(ok)s THEN 'ok' ELSE 'error' END
WHERE name = %(name)s
RETURNING name

-- Runs and errors ------------------------------------------------------------------

-- name: start_run
INSERT INTO runs (watch, source) VALUES (%(watch)s, %(source)s) RETURNING id

-- name: finish_run
UPDATE runs
SET ended_at = now(),
    status = %(status)s,
    inserts = %(inserts)s,
    updates = %(updates)s,
    deletes = %(deletes)s,
    truncates = %(truncates)s,
    rows_compared = %(rows_compared)s,
    error = %(error)s
WHERE id = %(id)s
RETURNING id

-- name: list_runs
SELECT id, watch, source, started_at, ended_at, status, inserts, updates, deletes, truncates,
       rows_compared, error
FROM runs
WHERE %(watch)s::text IS NULL OR watch = %(watch)s::text
ORDER BY id DESC
LIMIT %(limit)s

-- name: insert_error
INSERT INTO errors (watch, run_id, source, message, detail)
VALUES (%(watch)s, %(run_id)s, %(source)s, %(message)s, %(detail)s)
RETURNING id

-- name: list_errors
SELECT id, occurred_at, watch, run_id, source, message, detail
FROM errors
WHERE %(watch)s::text IS NULL OR watch = %(watch)s::text
ORDER BY id DESC
LIMIT %(limit)s
