-- Retention and crypto-erase. A data key is scoped: to a retention class, a patient (or none) and
-- a write window (a calendar month, for classes that expire), so destroying it makes exactly the
-- data that expired together unreadable, in backups and WAL copies too. The 'system' class (keys
-- sealing Courier's own secrets and data without a retention period) has no window.
-- retired_at: no longer used for new writes (key rotation); still opens what it sealed.
ALTER TABLE data_keys ADD COLUMN class TEXT NOT NULL DEFAULT 'system';
ALTER TABLE data_keys ADD COLUMN patient TEXT NOT NULL DEFAULT '';
ALTER TABLE data_keys ADD COLUMN window_end BIGINT NOT NULL DEFAULT 9223372036854775807;
ALTER TABLE data_keys ADD COLUMN retired_at BIGINT;
CREATE INDEX data_keys_scope ON data_keys (class, patient, window_end);
CREATE INDEX resource_versions_key ON resource_versions (key_id);
CREATE INDEX events_resource ON events (fhir_id);

-- Each resource's retention class, set from its current version (category, type).
ALTER TABLE resources ADD COLUMN retention_class TEXT NOT NULL DEFAULT 'system';
CREATE INDEX resources_retention ON resources (retention_class, last_updated);
-- Data stored before retention existed: its class by type (bodies are encrypted, so category
-- classes cannot be told here: such messages take the longer message class). Its versions stay
-- sealed under the system key, so the purge deletes them but cannot crypto-erase their copies.
UPDATE resources SET retention_class = 'message' WHERE res_type IN ('Communication', 'CommunicationRequest', 'Binary');
UPDATE resources SET retention_class = 'audit' WHERE res_type = 'AuditEvent';

-- Legal holds: a patient (Patient/x) or a thread (Communication/x: the message and what is partOf
-- it) whose data neither the purge nor an erasure may remove while the hold stands.
CREATE TABLE legal_holds (
    target     TEXT PRIMARY KEY,
    reason     TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- Where the audit chain starts once the oldest AuditEvents were purged at the end of their
-- retention: the hash of the last link removed, so verify still checks every remaining link.
-- `seal` is "seq|hash" sealed (AES-GCM) under the system key named by key_id: whoever can write the
-- database but not read the master key cannot move the anchor to hide a deleted prefix.
CREATE TABLE audit_chain_anchor (
    id        BIGINT PRIMARY KEY,
    seq       BIGINT NOT NULL,
    hash      TEXT NOT NULL,
    cut_at    BIGINT NOT NULL,
    links_cut BIGINT NOT NULL,
    key_id    TEXT NOT NULL,
    seal      BLOB NOT NULL
);

-- The audit chain's links are keyed from now on (HMAC-SHA-256 under this random key, sealed under
-- the system key), so whoever can write the database but not read the master key cannot recompute
-- them. Links made unkeyed by earlier builds are dropped; the sealer re-seals every row.
CREATE TABLE audit_chain_key (
    id     BIGINT PRIMARY KEY,
    key_id TEXT NOT NULL,
    seal   BLOB NOT NULL
);
DELETE FROM audit_chain;
