-- Repeating schedules (medication schedules): one row per occurrence of a request. A request with
-- one occurrenceDateTime has occurrence 0; a repeating one's occurrences are numbered by their
-- instant (due_at), so an edited schedule keeps what was sent.
CREATE TABLE schedule_runs (
    request_id       TEXT NOT NULL,
    occurrence       BIGINT NOT NULL,
    due_at           BIGINT NOT NULL,
    claimed_until    BIGINT NOT NULL DEFAULT 0,
    sent_at          BIGINT,
    communication_id TEXT,
    PRIMARY KEY (request_id, occurrence)
);
INSERT INTO schedule_runs (request_id, occurrence, due_at, claimed_until, sent_at, communication_id)
    SELECT request_id, 0, due_at, claimed_until, sent_at, communication_id FROM schedules;
DROP TABLE schedules;
ALTER TABLE schedule_runs RENAME TO schedules;
CREATE INDEX schedules_due ON schedules (sent_at, due_at);
