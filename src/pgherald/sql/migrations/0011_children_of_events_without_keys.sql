-- Migration 11: an event's field rows and its deliveries no longer check event_id against
-- events with foreign keys.
--
-- Every field row (one per changed column of an update) and every delivery the router
-- makes paid an RI trigger query for them, about 4-5 us of the server each (measured: a
-- field row costs 1.6 us without the key, 5.7-6.7 us with it). They guarded nothing that
-- can happen: both are written for events already in the log, in the transaction that
-- appends them (field rows) or after reading them (the router), and events are only ever
-- deleted by pruning, which now deletes their field rows and deliveries in the same
-- statement (retention.sql, delete_events) instead of leaving it to the keys' cascades.
-- A delivery's attempts still go with it by their own key's cascade.
ALTER TABLE event_fields DROP CONSTRAINT IF EXISTS event_fields_event_id_fkey;
ALTER TABLE deliveries DROP CONSTRAINT IF EXISTS deliveries_event_id_fkey;
