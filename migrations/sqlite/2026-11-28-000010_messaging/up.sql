-- The event log of the messaging resources: one row per version of a Communication or
-- CommunicationRequest, and per receipt change, written in the same transaction as the change.
-- It is what the WebSocket hub tails (every instance reads it, so a change made on one instance
-- reaches sockets on all of them) and what a reconnecting client catches up from. It holds
-- references only, never message text. On PostgreSQL rows are inserted under a transaction-scoped
-- advisory lock, so they commit in seq order and a tailer never skips a late-committing row.
CREATE TABLE events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    at         BIGINT NOT NULL,
    kind       TEXT NOT NULL,
    res_type   TEXT NOT NULL,
    fhir_id    TEXT NOT NULL,
    version_id BIGINT NOT NULL,
    detail     TEXT
);

-- Per-recipient delivery and read receipts of Communications, set by the recipient only.
CREATE TABLE receipts (
    comm_id      TEXT NOT NULL,
    recipient    TEXT NOT NULL,
    delivered_at BIGINT,
    read_at      BIGINT,
    PRIMARY KEY (comm_id, recipient)
);
