-- The durable outbox of resources to deliver to EHRs (AuditEvents that concern a person the EHR
-- knows). A row is written in the same transaction as the resource; a worker delivers it with
-- retry and backoff, and marks it delivered. Each row's id is the stable identifier the EHR's
-- conditional create matches on, so a retry never makes a second copy.
CREATE TABLE outbox (
    id              TEXT PRIMARY KEY,
    ehr             TEXT NOT NULL,
    res_type        TEXT NOT NULL,
    res_id          TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    last_error      TEXT,
    delivered_at    BIGINT
);
CREATE INDEX outbox_due ON outbox (delivered_at, next_attempt_at);
