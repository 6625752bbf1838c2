-- Issue 22 §3. Multi-factor sign-in: Courier's own second factors, per Courier identity.
-- A passkey (the WebAuthn credential: public key, counter) or a TOTP secret, sealed (AES-256-GCM
-- under Courier's system data key). last_step: the last TOTP time step accepted (a code is never
-- accepted twice, RFC 6238 §5.2).
CREATE TABLE mfa_factors (
    id           TEXT PRIMARY KEY,
    user_ref     TEXT NOT NULL,
    kind         TEXT NOT NULL,
    label        TEXT NOT NULL,
    key_id       TEXT NOT NULL,
    sealed       BYTEA NOT NULL,
    last_step    BIGINT NOT NULL DEFAULT 0,
    created_at   BIGINT NOT NULL,
    last_used_at BIGINT
);
CREATE INDEX mfa_factors_user ON mfa_factors (user_ref);
-- One-time recovery codes: salted HMAC-SHA-256 only, each usable once.
CREATE TABLE mfa_recovery_codes (
    user_ref  TEXT NOT NULL,
    salt      TEXT NOT NULL,
    code_hash TEXT NOT NULL,
    used_at   BIGINT,
    PRIMARY KEY (user_ref, salt)
);
-- Failed second-factor attempts per person, and the lockout they lead to.
CREATE TABLE mfa_guard (
    user_ref     TEXT PRIMARY KEY,
    failures     BIGINT NOT NULL,
    window_start BIGINT NOT NULL,
    locked_until BIGINT NOT NULL
);
-- A sign-in waiting for its second factor: the finished launch (sealed, with the EHR's tokens)
-- and the challenge in progress. Single use, 10 minutes. verified: the amr of the factor that
-- passed, once one has.
CREATE TABLE mfa_tickets (
    ticket_hash TEXT PRIMARY KEY,
    user_ref    TEXT NOT NULL,
    key_id      TEXT NOT NULL,
    sealed      BYTEA NOT NULL,
    verified    TEXT,
    expires_at  BIGINT NOT NULL
);
CREATE INDEX mfa_tickets_expiry ON mfa_tickets (expires_at);
CREATE INDEX mfa_tickets_user ON mfa_tickets (user_ref);
-- The policy per EHR, for its EHR launches (mfa) and its portal's standalone launches
-- (portal_mfa): off | trust-ehr | writes | always; mfa_acr: acr values that show a second factor.
ALTER TABLE ehrs ADD COLUMN mfa TEXT NOT NULL DEFAULT 'trust-ehr';
ALTER TABLE ehrs ADD COLUMN portal_mfa TEXT NOT NULL DEFAULT 'trust-ehr';
ALTER TABLE ehrs ADD COLUMN mfa_acr TEXT NOT NULL DEFAULT '';
-- The authentication methods (RFC 8176 amr) of the session's sign-in, carried into each token.
ALTER TABLE ehr_sessions ADD COLUMN amr TEXT NOT NULL DEFAULT '';
