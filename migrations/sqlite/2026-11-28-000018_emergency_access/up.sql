-- Emergency access ("break the glass", HIPAA 164.312(a)(2)(ii)): a clinician, giving a reason,
-- reads one patient's messages outside their own compartment for a limited time. Every grant is
-- kept here for review (`courier emergency list`) and audited with purpose BTG. The reason may
-- carry clinical detail: it is sealed like a resource body (under the system key named by key_id).
CREATE TABLE emergency_access (
    user_ref   TEXT NOT NULL,
    patient    TEXT NOT NULL,
    key_id     TEXT NOT NULL,
    reason     BLOB NOT NULL,
    granted_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (user_ref, patient, granted_at)
);
CREATE INDEX emergency_access_user ON emergency_access (user_ref, expires_at);
