-- Issue 23: web push (RFC 8030, payloads encrypted per RFC 8291, VAPID per RFC 8292).
-- A browser's push subscription for a person: its endpoint (a capability URL) and keys, sealed.
-- id: SHA-256 of the endpoint, so a device registered again (by the same or another person)
-- is one row, belonging to whoever turned it on last.
CREATE TABLE notify_push (
    id           TEXT PRIMARY KEY,
    person       TEXT NOT NULL,
    key_id       TEXT NOT NULL,
    sealed       BYTEA NOT NULL,
    created_at   BIGINT NOT NULL,
    last_sent_at BIGINT
);
CREATE INDEX notify_push_person ON notify_push (person);
-- Courier's VAPID key (one P-256 key, made at first use; the private half sealed).
CREATE TABLE notify_vapid (
    id         BIGINT PRIMARY KEY,
    key_id     TEXT NOT NULL,
    sealed     BYTEA NOT NULL,
    public_key TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
-- The language of a person's notices: from their EHR record (Patient.communication preferred) at
-- each launch, unless they chose one in the app (language_chosen = 1).
ALTER TABLE notify_prefs ADD COLUMN language TEXT;
ALTER TABLE notify_prefs ADD COLUMN language_chosen BIGINT NOT NULL DEFAULT 0;
-- A later bounce (a DSN read by `courier notify bounce`) of an email notice: no more email to
-- the address until the person gives another in the app.
ALTER TABLE notify_contacts ADD COLUMN bounced_at BIGINT;
