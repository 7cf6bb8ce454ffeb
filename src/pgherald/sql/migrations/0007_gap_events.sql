-- Migration 7: 'gap' events. When pgherald's replication slot is dropped by the slot
-- safety policy (drop-and-resync) or was invalidated by the server, the change log may
-- miss the changes of a range of time; a 'gap' event per watch names that range (in its
-- meta), and the table's rows follow as 'read' events, so no reader has a silent hole.
ALTER TABLE events DROP CONSTRAINT events_op_check;
ALTER TABLE events ADD CONSTRAINT events_op_check
    CHECK (op IN ('insert', 'update', 'delete', 'truncate', 'read', 'schema', 'message', 'gap'));
