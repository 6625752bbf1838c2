CREATE TABLE schedule_single (
    request_id       TEXT PRIMARY KEY,
    due_at           BIGINT NOT NULL,
    claimed_until    BIGINT NOT NULL DEFAULT 0,
    sent_at          BIGINT,
    communication_id TEXT
);
INSERT INTO schedule_single SELECT request_id, due_at, claimed_until, sent_at, communication_id FROM schedules WHERE occurrence = 0;
DROP TABLE schedules;
ALTER TABLE schedule_single RENAME TO schedules;
CREATE INDEX schedules_due ON schedules (sent_at, due_at);
