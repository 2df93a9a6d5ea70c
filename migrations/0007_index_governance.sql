-- Index governance: the shapes of the queries the server runs (no values), and the expression
-- indexes it manages for them. Core indexes are never listed here, so never touched.

CREATE TABLE query_shapes (
    shape_id   text PRIMARY KEY,          -- hash of `shape`
    doc_type   text NOT NULL,
    shape      jsonb NOT NULL,            -- structure and value kinds only
    calls      bigint NOT NULL DEFAULT 0,
    total_ms   double precision NOT NULL DEFAULT 0,
    -- Calls per latency bucket (bounds in src/governance.rs), for percentiles.
    buckets    bigint[] NOT NULL,
    first_seen timestamptz NOT NULL DEFAULT now(),
    last_seen  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE managed_indexes (
    name         text PRIMARY KEY,        -- vibe_auto_<hash>: never a core index
    doc_type     text NOT NULL,
    path         text[] NOT NULL,         -- the data path
    kind         text NOT NULL CHECK (kind IN ('number', 'string')),
    definition   text NOT NULL,
    shape_id     text,
    status       text NOT NULL CHECK (status IN ('building', 'ready', 'failed', 'dropped')),
    error        text,
    requested_by text NOT NULL,           -- a DID, or 'policy'
    created_at   timestamptz NOT NULL DEFAULT now(),
    ready_at     timestamptz,
    -- pg_stat_user_indexes.idx_scan when last checked, and when it last grew.
    last_scans   bigint NOT NULL DEFAULT 0,
    last_used_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (doc_type, path, kind)
);
