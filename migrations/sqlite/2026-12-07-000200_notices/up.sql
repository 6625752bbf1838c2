-- Issue 23. Reaching people outside the app, with no PHI in what is sent.
-- A person's contact points (kind email or sms: an E.164 mobile number), sealed; from the EHR's record (Patient.telecom,
-- Practitioner.telecom) at each launch.
CREATE TABLE notify_contacts (
    person      TEXT NOT NULL,
    kind        TEXT NOT NULL,
    key_id      TEXT NOT NULL,
    sealed      BLOB NOT NULL,
    source      TEXT NOT NULL,
    verified_at BIGINT,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (person, kind)
);
-- A person's choices: channels turned off, kinds of notice turned off (new-message, reminder),
-- quiet hours (HH:MM to HH:MM in their IANA time zone), a digest interval (at most one notice of
-- new messages per channel in that many minutes), and the token of their unsubscribe link.
CREATE TABLE notify_prefs (
    person         TEXT PRIMARY KEY,
    email_off      BIGINT NOT NULL DEFAULT 0,
    sms_off        BIGINT NOT NULL DEFAULT 0,
    quiet_from     TEXT,
    quiet_to       TEXT,
    time_zone      TEXT,
    kinds_off      TEXT NOT NULL DEFAULT '',
    digest_minutes BIGINT NOT NULL DEFAULT 0,
    unsubscribe    TEXT NOT NULL,
    updated_at     BIGINT NOT NULL
);
CREATE UNIQUE INDEX notify_prefs_unsubscribe ON notify_prefs (unsubscribe);
-- Notices decided in the message's own transaction: one per recipient of a new message and
-- channel (email, sms) they can be reached by. A worker
-- with a lease sends each once it is due (not read in the app within COURIER_NOTIFY_AFTER_SECS).
-- state: pending | sending | sent | skipped | parked | uncertain (a send cut off by a crash: never
-- sent again, counted for the operator).
CREATE TABLE notices (
    id              TEXT PRIMARY KEY,
    person          TEXT NOT NULL,
    kind            TEXT NOT NULL,
    about           TEXT NOT NULL,
    state           TEXT NOT NULL,
    channel         TEXT,
    urgent          BIGINT NOT NULL DEFAULT 0,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    lease_owner     TEXT,
    lease_until     BIGINT NOT NULL DEFAULT 0,
    reason          TEXT,
    created_at      BIGINT NOT NULL,
    sent_at         BIGINT
);
CREATE INDEX notices_due ON notices (state, next_attempt_at);
CREATE INDEX notices_about ON notices (about);
CREATE INDEX notices_person ON notices (person);
-- An address or number the person typed in the app, waiting for the one-time code sent to it
-- (only its salted hash kept; 10 minutes, 5 tries).
CREATE TABLE notify_pending_contacts (
    person     TEXT NOT NULL,
    kind       TEXT NOT NULL,
    key_id     TEXT NOT NULL,
    sealed     BLOB NOT NULL,
    code_hash  TEXT NOT NULL,
    tries      BIGINT NOT NULL DEFAULT 0,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (person, kind)
);
