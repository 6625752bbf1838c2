-- The tamper-evident chain over the audit trail: one link per stored AuditEvent version, in the
-- order the sealer (the leader) found them. Each hash covers the previous hash and the row as
-- stored (its identity, key id and ciphertext), so editing, replacing or deleting a sealed row
-- breaks the chain from that link on (`courier audit verify`).
CREATE TABLE audit_chain (
    seq      BIGSERIAL PRIMARY KEY,
    vid       BIGINT NOT NULL UNIQUE,
    audit_id  TEXT NOT NULL,
    hash      TEXT NOT NULL,
    sealed_at BIGINT NOT NULL
);
