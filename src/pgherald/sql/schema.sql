-- pgherald's store, at its latest version, in one file.
--
-- Installs go through sql/migrations/ (store/migrations.py); this file is the reference
-- that a test proves equal to the result of all migrations, and what a reader studies
-- to learn the store. Names are unqualified: it runs with search_path set to the
-- store's schema (default "pgherald").

-- The applied migrations; the highest version is the schema's version.
CREATE TABLE schema_version (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- What to watch and how; one row per watch, with its running status.
CREATE TABLE watches (
    name text PRIMARY KEY CHECK (name <> ''),
    schema_name text,
    table_name text,
    method text NOT NULL CHECK (method IN ('logical', 'trigger', 'snapshot', 'listen')),
    key_columns text[] NOT NULL DEFAULT '{}',
    columns text[],                                  -- NULL: every column
    ignore_columns text[] NOT NULL DEFAULT '{}',
    query text,                                      -- snapshot watches of a SQL query
    options jsonb NOT NULL DEFAULT '{}',
    enabled boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    last_run_at timestamptz,
    last_success_at timestamptz,
    last_error text,
    changes_seen bigint NOT NULL DEFAULT 0,
    status text NOT NULL DEFAULT 'new',
    CONSTRAINT watches_table_or_query CHECK (
        method = 'listen' OR table_name IS NOT NULL OR query IS NOT NULL
    )
);

-- One capture pass: a snapshot comparison, a trigger queue drain, a logical session.
CREATE TABLE runs (
    id bigserial PRIMARY KEY,
    watch text,                                      -- NULL: a run of a whole source
    source text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    ended_at timestamptz,
    status text NOT NULL DEFAULT 'running'
        CHECK (status IN ('running', 'ok', 'error', 'aborted')),
    inserts bigint NOT NULL DEFAULT 0,
    updates bigint NOT NULL DEFAULT 0,
    deletes bigint NOT NULL DEFAULT 0,
    truncates bigint NOT NULL DEFAULT 0,
    rows_compared bigint,
    error text
);
CREATE INDEX runs_watch_started_idx ON runs (watch, started_at DESC);
CREATE INDEX runs_started_idx ON runs (started_at DESC);

-- What went wrong, when and where, for the dashboard and for `pgherald status`.
CREATE TABLE errors (
    id bigserial PRIMARY KEY,
    occurred_at timestamptz NOT NULL DEFAULT now(),
    watch text,
    run_id bigint REFERENCES runs (id) ON DELETE SET NULL,
    source text,
    message text NOT NULL,
    detail jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX errors_occurred_idx ON errors (occurred_at DESC);
CREATE INDEX errors_watch_occurred_idx ON errors (watch, occurred_at DESC);
CREATE INDEX errors_run_idx ON errors (run_id);

-- Row shapes (ordered [name, type_oid, type_name] lists), stored once and shared by events.
CREATE TABLE shapes (
    id serial PRIMARY KEY,
    digest text NOT NULL UNIQUE,
    columns jsonb NOT NULL,
    names text[] NOT NULL,                           -- the column names, for SQL that works by name
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The change log. Values are PostgreSQL's text output, aligned with the shape's columns.
CREATE TABLE events (
    id bigserial PRIMARY KEY,                        -- log order
    event_id text NOT NULL UNIQUE,                   -- stable across replays: the idempotency key
    watch text NOT NULL,
    op text NOT NULL
        CHECK (op IN ('insert', 'update', 'delete', 'truncate', 'read', 'schema')),
    schema_name text NOT NULL,
    table_name text NOT NULL,
    row_key text,                                    -- JSON array of the key columns' texts
    key_columns text[] NOT NULL DEFAULT '{}',
    shape_id integer REFERENCES shapes (id),         -- shape of new_values (of old_values if none)
    old_shape_id integer REFERENCES shapes (id),     -- shape of old_values when it differs
    old_values text[],
    new_values text[],
    unchanged text[],                                -- new columns left as unchanged TOAST
    old_unchanged text[],                            -- old columns left as unchanged TOAST
    changed text[],
    xid bigint,
    position text NOT NULL,
    commit_time timestamptz,
    captured_at timestamptz NOT NULL,
    method text NOT NULL CHECK (method IN ('logical', 'trigger', 'snapshot', 'listen')),
    seq integer NOT NULL DEFAULT 0,
    old_values_source text NOT NULL DEFAULT 'none'
        CHECK (old_values_source IN ('replica_identity', 'change_log', 'snapshot', 'trigger', 'none')),
    meta jsonb NOT NULL DEFAULT '{}'
);
-- Few indexes on purpose: each one costs every append. A row's history (and filling old
-- values from it), a watch's events in log order, and `--since` / retention by time.
CREATE INDEX events_watch_row_key_idx ON events (watch, row_key, id);
CREATE INDEX events_watch_id_idx ON events (watch, id);
CREATE INDEX events_captured_at_idx ON events (captured_at);

-- Field-level detail of updates: one row per changed column.
CREATE TABLE event_fields (
    event_id bigint NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    column_name text NOT NULL,
    old_value text,
    new_value text,
    PRIMARY KEY (event_id, column_name)
);

-- How far each source got; saved in the transaction that stores its events.
CREATE TABLE checkpoints (
    source text PRIMARY KEY,
    position text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Destinations and who gets what (delivery builds on these).
CREATE TABLE sinks (
    name text PRIMARY KEY CHECK (name <> ''),
    kind text NOT NULL,
    format text NOT NULL DEFAULT 'pgherald',
    config jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE subscriptions (
    id bigserial PRIMARY KEY,
    sink text NOT NULL REFERENCES sinks (name) ON DELETE CASCADE ON UPDATE CASCADE,
    watch text NOT NULL REFERENCES watches (name) ON DELETE CASCADE ON UPDATE CASCADE,
    filter jsonb NOT NULL DEFAULT '{}',
    ignore_columns text[] NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (sink, watch)
);
CREATE INDEX subscriptions_watch_idx ON subscriptions (watch);

CREATE TABLE deliveries (
    id bigserial PRIMARY KEY,
    event_id bigint NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    sink text NOT NULL REFERENCES sinks (name) ON DELETE CASCADE ON UPDATE CASCADE,
    status text NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'delivering', 'delivered', 'failed', 'dead')),
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error text,
    delivered_at timestamptz,
    claimed_by text,
    claimed_until timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (event_id, sink)
);
-- The claim query's index: due deliveries in order, without the finished ones.
CREATE INDEX deliveries_due_idx ON deliveries (next_attempt_at, id)
    WHERE status IN ('pending', 'failed');
CREATE INDEX deliveries_sink_status_idx ON deliveries (sink, status);

INSERT INTO schema_version (version) VALUES (1);
