-- Issue 24: a version names its data key by a number (`data_keys.n`) instead of the key's text id
-- (25-36 characters, stored in the version row and again in its index): about 90 bytes less per
-- message with its AuditEvent. The text id stays the key's identity everywhere else (and in the
-- audit chain's hash, which reads it through the number).
ALTER TABLE data_keys ADD COLUMN n INTEGER;
UPDATE data_keys SET n = rowid;
CREATE UNIQUE INDEX data_keys_n ON data_keys (n);
-- Every new key is numbered on insert (PostgreSQL: a sequence). A number is reused only if the
-- highest key is destroyed, which happens only when no version is sealed under it.
CREATE TRIGGER data_keys_number AFTER INSERT ON data_keys WHEN NEW.n IS NULL
BEGIN
    UPDATE data_keys SET n = (SELECT COALESCE(MAX(n), 0) + 1 FROM data_keys) WHERE key_id = NEW.key_id;
END;
ALTER TABLE resource_versions ADD COLUMN key_n BIGINT NOT NULL DEFAULT 0;
UPDATE resource_versions SET key_n = COALESCE((SELECT k.n FROM data_keys k WHERE k.key_id = resource_versions.key_id), 0);
DROP INDEX resource_versions_key;
ALTER TABLE resource_versions DROP COLUMN key_id;
CREATE INDEX resource_versions_key ON resource_versions (key_n);
