-- Migration 4: reading the change log for people (feeds and HTML pages).

-- A feed is its sink's delivered deliveries, newest first: read a page at a time from here
-- instead of sorting all of them on every fetch.
CREATE INDEX deliveries_delivered_idx ON deliveries (sink, event_id DESC)
    WHERE status = 'delivered';

-- A snapshot run's changes (their position is the run's id), for its page and digests.
-- Partial: appends of other capture methods do not pay for it.
CREATE INDEX events_snapshot_run_idx ON events (watch, position, id)
    WHERE method = 'snapshot';
