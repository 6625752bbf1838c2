-- Pending SMART launches: one row per authorization request Courier sent to an EHR, looked up by
-- its state (at least 128 bits of entropy) when the EHR redirects back; deleted on first use, and
-- useless once expired.
CREATE TABLE launch_states (
    state       TEXT PRIMARY KEY,
    ehr         TEXT NOT NULL,
    verifier    TEXT NOT NULL,
    nonce       TEXT NOT NULL,
    launch      TEXT,
    expires_at  BIGINT NOT NULL
);
CREATE INDEX launch_states_expiry ON launch_states (expires_at);
