-- Appending events that a source selects in SQL (store/selected.py). Runs with the store's
-- search path, after append_lock (queries.sql), in the transaction that reads the source's
-- input: trigger capture's queue rows become events without passing through Python.
-- In braces: the source's SELECT (see store/selected.py for its columns) and constants
-- written in once per SELECT (the batch's shapes, the NOTIFY channel); values are
-- parameters. Comment lines are left out of what is sent (a statement over 4 kB is parsed
-- again by psycopg at every execution).

-- name: insert_selected
-- As the change log's appends do (upsert_shapes, then the events, then notify_appended),
-- in one statement: the batch's shapes stored if new (appenders hold the append lock, so
-- none is being inserted by anyone else, and the statement's snapshot has every committed
-- one), ids in the rows' order, one field row per changed column of an update (its text
-- in the old row and in the new one), the watches' activity as record_watch_activity
-- notes it, and the wake-up for tailing readers (the highest id appended). Like the
-- direct COPY path it has no ON CONFLICT (which costs every row a speculative insertion):
-- an event_id already in the log fails it on the unique index, and the caller takes the
-- idempotent path instead. Returns the events stored per watch and method.
WITH wanted AS (
    SELECT l.label, l.digest, l.columns
    FROM unnest({labels}::text[], {digests}::text[], {columns}::jsonb[])
         AS l (label, digest, columns)
),
new_shapes AS (
    INSERT INTO shapes (digest, columns, names)
    SELECT DISTINCT ON (w.digest) w.digest, w.columns,
           ARRAY(SELECT c.col ->> 0
                 FROM jsonb_array_elements(w.columns) WITH ORDINALITY AS c (col, i)
                 ORDER BY c.i)
    FROM wanted w
    WHERE NOT EXISTS (SELECT FROM shapes s WHERE s.digest = w.digest)
    ON CONFLICT (digest) DO NOTHING
    RETURNING id, digest, names
),
shape_ids AS (
    SELECT w.label, s.id, s.names
    FROM wanted w
    JOIN (SELECT id, digest, names FROM shapes WHERE digest = ANY ({digests}::text[])
          UNION ALL
          SELECT id, digest, names FROM new_shapes) AS s ON s.digest = w.digest
),
inserted AS (
    INSERT INTO events (
        event_id, watch, op, schema_name, table_name, row_key, key_columns, shape_id,
        old_values, new_values, changed, xid, position, commit_time, captured_at, method, seq,
        old_values_source, meta
    )
    SELECT r.event_id, r.watch, r.op, r.schema_name, r.table_name, r.row_key, r.key_columns,
           si.id, r.old_values, r.new_values, r.changed, r.xid, r.position, r.commit_time,
           r.captured_at, r.method, r.seq, r.old_values_source, r.meta
    FROM ({rows}) AS r
    LEFT JOIN shape_ids si ON si.label = r.shape
    ORDER BY r.ord
    RETURNING id, watch, method, op, shape_id, old_values, new_values, changed
),
fields AS (
    INSERT INTO event_fields (event_id, column_name, old_value, new_value)
    SELECT i.id, c.name,
           i.old_values[array_position(si.names, c.name)],
           i.new_values[array_position(si.names, c.name)]
    FROM inserted i
    JOIN shape_ids si ON si.id = i.shape_id
    CROSS JOIN LATERAL unnest(i.changed) AS c (name)
    WHERE i.op = 'update'
),
counted AS (
    SELECT watch, method, count(*) AS n FROM inserted GROUP BY watch, method
),
activity AS (
    UPDATE watches w
    SET last_run_at = now(),
        last_success_at = now(),
        last_error = NULL,
        changes_seen = w.changes_seen + a.n,
        status = CASE WHEN NOT w.enabled THEN 'disabled' ELSE 'ok' END
    FROM (SELECT watch, sum(n) AS n FROM counted GROUP BY watch) AS a
    WHERE w.name = a.watch
),
notified AS MATERIALIZED (
    SELECT pg_notify({channel}, max(id)::text) FROM inserted HAVING max(id) IS NOT NULL
)
SELECT c.watch, c.method, c.n
FROM counted c
CROSS JOIN (SELECT count(*) FROM notified) AS sent
