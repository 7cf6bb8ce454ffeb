-- Retention: how long the change log keeps a watch's events, as written ("400d",
-- "forever"); NULL: the configuration's `retain`, else forever. Parsed and applied by
-- pgherald (pgherald.retain, pgherald.pruning), which prunes by the existing indexes:
-- events (watch, id) and (watch, row_key, id), runs and errors by (watch, time).
ALTER TABLE watches ADD COLUMN retain text CHECK (retain <> '');
