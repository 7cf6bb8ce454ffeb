-- Migration 3: what the delivery engine needs. Sinks can be disabled, strictly ordered,
-- and have their own number of attempts; deliveries know the row they belong to (their
-- order key), so that one row's events go out in log order; every attempt is recorded.

ALTER TABLE sinks
    ADD COLUMN enabled boolean NOT NULL DEFAULT true,
    ADD COLUMN strictly_ordered boolean NOT NULL DEFAULT false,
    ADD COLUMN max_attempts integer NOT NULL DEFAULT 10 CHECK (max_attempts >= 1);

ALTER TABLE deliveries ADD COLUMN order_key text NOT NULL DEFAULT '';

-- A subscription gets the events logged after it was made, not the whole history.
ALTER TABLE subscriptions ADD COLUMN from_event bigint NOT NULL DEFAULT 0;

DROP INDEX deliveries_due_idx;
-- Claims: a sink's open deliveries in log order.
CREATE INDEX deliveries_claim_idx ON deliveries (sink, id)
    WHERE status IN ('pending', 'failed');
-- "Is an earlier delivery of this row still open?" (per-row order).
CREATE INDEX deliveries_order_idx ON deliveries (sink, order_key, id)
    WHERE status IN ('pending', 'failed', 'delivering');

CREATE TABLE delivery_attempts (
    id bigserial PRIMARY KEY,
    delivery_id bigint NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    attempted_at timestamptz NOT NULL DEFAULT now(),
    outcome text NOT NULL CHECK (outcome IN ('delivered', 'retry', 'dead')),
    error text
);
CREATE INDEX delivery_attempts_delivery_idx ON delivery_attempts (delivery_id);
