-- Signed-in users after a SMART launch. The web app holds a random handle (only its SHA-256 is
-- stored); the EHR's access and refresh tokens are sealed like resource bodies. A session ends on
-- logout, after the configured idle time, or when the EHR refuses to refresh it.
CREATE TABLE ehr_sessions (
    handle_hash    TEXT PRIMARY KEY,
    ehr            TEXT NOT NULL,
    fhir_user      TEXT NOT NULL,
    patient        TEXT,
    encounter      TEXT,
    scope          TEXT NOT NULL,
    key_id         TEXT NOT NULL,
    ehr_tokens     BYTEA NOT NULL,
    ehr_expires_at BIGINT NOT NULL,
    last_active    BIGINT NOT NULL,
    created_at     BIGINT NOT NULL
);
