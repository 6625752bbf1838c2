-- Issue 24: a link of the audit chain keeps its hash as 32 bytes instead of 64 hex characters,
-- and no copy of the AuditEvent's id (the id is part of the hash; `courier audit verify` names
-- it from the row). About 70 bytes less per AuditEvent.
ALTER TABLE audit_chain DROP COLUMN audit_id;
ALTER TABLE audit_chain ALTER COLUMN hash TYPE BYTEA USING decode(hash, 'hex');
