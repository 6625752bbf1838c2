-- The EHRs Courier works with, as a SMART confidential asymmetric client of each: the EHR's FHIR
-- base (iss), Courier's client id there, and Courier's signing key for that EHR (private half
-- sealed like a resource body; public half published at /smart/jwks).
CREATE TABLE ehrs (
    name           TEXT PRIMARY KEY,
    iss            TEXT NOT NULL UNIQUE,
    client_id      TEXT NOT NULL,
    alg            TEXT NOT NULL,
    kid            TEXT NOT NULL,
    key_id         TEXT NOT NULL,
    private_key    BYTEA NOT NULL,
    public_jwk     TEXT NOT NULL,
    launch_scopes  TEXT NOT NULL,
    backend_scopes TEXT NOT NULL,
    created_at     BIGINT NOT NULL
);
