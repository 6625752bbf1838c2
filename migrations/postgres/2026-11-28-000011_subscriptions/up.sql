-- Topic-based Subscriptions (FHIR R5 Backport IG for R4). A Subscription is kept here, not in the
-- versioned resource store: its body (endpoint, headers) is sealed like a resource body, its HMAC
-- secret sealed apart and never shown, and its delivery state changes far more often than the
-- resource itself. The owner is the client (and user) that created it: notifications pass the
-- owner's grant, exactly as its reads would.
CREATE TABLE subscriptions (
    id                 TEXT PRIMARY KEY,
    key_id             TEXT NOT NULL,
    body               BYTEA NOT NULL,
    secret             BYTEA,
    owner_client       TEXT NOT NULL,
    owner_scope        TEXT NOT NULL,
    owner_user         TEXT,
    owner_patient      TEXT,
    topic              TEXT NOT NULL,
    channel            TEXT NOT NULL,
    content            TEXT NOT NULL,
    status             TEXT NOT NULL,
    heartbeat_secs     BIGINT NOT NULL DEFAULT 0,
    max_count          BIGINT NOT NULL DEFAULT 20,
    start_seq          BIGINT NOT NULL DEFAULT 0,
    events_since_start BIGINT NOT NULL DEFAULT 0,
    delivered          BIGINT NOT NULL DEFAULT 0,
    attempts           BIGINT NOT NULL DEFAULT 0,
    next_attempt_at    BIGINT NOT NULL DEFAULT 0,
    last_sent_at       BIGINT NOT NULL DEFAULT 0,
    last_error         TEXT,
    created_at         BIGINT NOT NULL
);

-- The events each subscription has been notified of (or will be), numbered per subscription as
-- the IG asks; $events reads them back.
CREATE TABLE subscription_events (
    sub_id     TEXT NOT NULL,
    number     BIGINT NOT NULL,
    event_seq  BIGINT NOT NULL,
    PRIMARY KEY (sub_id, number)
);

-- How far a background job has read the event log.
CREATE TABLE job_cursors (
    name TEXT PRIMARY KEY,
    seq  BIGINT NOT NULL
);

-- Single-use tokens that bind a websocket to subscriptions ($get-ws-binding-token); only hashes.
CREATE TABLE ws_binding_tokens (
    token_hash TEXT PRIMARY KEY,
    sub_id     TEXT NOT NULL,
    owner_client TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
