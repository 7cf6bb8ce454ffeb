-- Appending events that a source selects in SQL (store/selected.py). Runs with the store's
-- search path, after append_lock (queries.sql), in the transaction that reads the source's
-- input: trigger capture's queue rows become events without passing through Python.
-- {rows} is the source's SELECT (see store/selected.py for its columns); values are
-- parameters.

-- name: insert_selected
-- As insert_events does for a staged batch: ids in the rows' order, a replayed event_id
-- skipped with its field rows, one field row per changed column of an update (its text in
-- the old row and in the new one), and the watches' activity noted as
-- record_watch_activity notes it. Returns the events stored per watch and method.
WITH shape_ids AS (
    SELECT l.label, s.id, s.names
    FROM unnest(%(selected_labels)s::text[], %(selected_digests)s::text[]) AS l (label, digest)
    JOIN shapes s ON s.digest = l.digest
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
    ON CONFLICT (event_id) DO NOTHING
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
)
SELECT watch, method, n FROM counted
