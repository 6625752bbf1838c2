-- Issue 19 H/I. A probe write: /readyz and the start write and remove one row here to learn
-- whether a write that needs new space succeeds now (the table stays empty).
CREATE TABLE write_probe (
    id  TEXT PRIMARY KEY,
    at  BIGINT NOT NULL,
    pad BYTEA NOT NULL
);
-- Which instance claimed a scheduled send: an instance that restarts releases its own claims at
-- once instead of waiting for their lease (COURIER_INSTANCE_ID).
ALTER TABLE schedules ADD COLUMN claimed_by TEXT;
-- The access token (jti) that asked for a websocket binding token: the subscription socket closes
-- when that token is revoked.
ALTER TABLE ws_binding_tokens ADD COLUMN jti TEXT;
