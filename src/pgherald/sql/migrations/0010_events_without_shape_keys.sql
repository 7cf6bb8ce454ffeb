-- Migration 10: the change log's events no longer check shape_id and old_shape_id against
-- shapes with foreign keys.
--
-- Every event row paid for them: an RI trigger query per key and row, each locking the
-- shape's row FOR KEY SHARE, so concurrent appenders (capture, snapshot runs) shared those
-- locks through MultiXacts. They guarded nothing that can happen: a shape is stored, in
-- the same transaction or an earlier committed one, before any event names it
-- (ChangeLog.append), and shapes are never deleted or updated (only the whole schema is
-- dropped). Measured with bench_logical_throughput.py: the store backend's CPU per
-- appended event fell by about a third (see bench/README.md).
ALTER TABLE events
    DROP CONSTRAINT IF EXISTS events_shape_id_fkey,
    DROP CONSTRAINT IF EXISTS events_old_shape_id_fkey;
