-- Scheduled messages: an active CommunicationRequest with an occurrenceDateTime is due at that
-- time. Rows are kept by the write path (in the request's own transaction) and claimed by the
-- senders with a lease (FOR UPDATE SKIP LOCKED on PostgreSQL); the Communication sent is created
-- conditionally on identifier urn:courier:schedule|<request id>, so a retry never sends twice.
CREATE TABLE schedules (
    request_id       TEXT PRIMARY KEY,
    due_at           BIGINT NOT NULL,
    claimed_until    BIGINT NOT NULL DEFAULT 0,
    sent_at          BIGINT,
    communication_id TEXT
);
CREATE INDEX schedules_due ON schedules (sent_at, due_at);
