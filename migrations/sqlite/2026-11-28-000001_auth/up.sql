-- Courier's authorization server: registered clients (SMART Backend Services), Courier's own
-- token-signing keys, used client-assertion ids (replay protection) and revoked access tokens.
CREATE TABLE oauth_clients (
    client_id  TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    jwks_url   TEXT,
    jwks       TEXT,
    scopes     TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- Private keys are sealed like resource bodies (AES-256-GCM under the data key named by key_id).
-- retired_at NULL: the key that signs new tokens. Retired keys stay published (and accepted) until
-- every token they signed has expired.
CREATE TABLE signing_keys (
    kid         TEXT PRIMARY KEY,
    alg         TEXT NOT NULL,
    key_id      TEXT NOT NULL,
    private_key BLOB NOT NULL,
    public_jwk  TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    retired_at  BIGINT
);

CREATE TABLE used_assertions (
    client_id  TEXT NOT NULL,
    jti        TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (client_id, jti)
);
CREATE INDEX used_assertions_expiry ON used_assertions (expires_at);

CREATE TABLE revoked_tokens (
    jti        TEXT PRIMARY KEY,
    expires_at BIGINT NOT NULL
);
CREATE INDEX revoked_tokens_expiry ON revoked_tokens (expires_at);
