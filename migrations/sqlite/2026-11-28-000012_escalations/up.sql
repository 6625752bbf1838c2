-- Escalation of unread urgent messages: the job's state per (message, recipient). What it does is
-- visible in FHIR as a CommunicationRequest (identifier urn:courier:escalation), written through
-- the one write path, so it is versioned, audited and pushed like any other change.
CREATE TABLE escalations (
    comm_id          TEXT NOT NULL,
    recipient        TEXT NOT NULL,
    request_id       TEXT NOT NULL,
    reminders        BIGINT NOT NULL,
    last_reminder_at BIGINT NOT NULL,
    escalated_at     BIGINT,
    done             BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (comm_id, recipient)
);
CREATE INDEX escalations_open ON escalations (done);
