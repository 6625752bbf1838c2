-- Issue 24: a version names its data key by a number (`data_keys.n`) instead of the key's text id
-- (stored in the version row and again in its index). The text id stays the key's identity
-- everywhere else (and in the audit chain's hash, which reads it through the number).
ALTER TABLE data_keys ADD COLUMN n BIGSERIAL;
CREATE UNIQUE INDEX data_keys_n ON data_keys (n);
ALTER TABLE resource_versions ADD COLUMN key_n BIGINT;
UPDATE resource_versions v SET key_n = k.n FROM data_keys k WHERE k.key_id = v.key_id;
UPDATE resource_versions SET key_n = 0 WHERE key_n IS NULL;
ALTER TABLE resource_versions ALTER COLUMN key_n SET NOT NULL;
DROP INDEX resource_versions_key;
ALTER TABLE resource_versions DROP COLUMN key_id;
CREATE INDEX resource_versions_key ON resource_versions (key_n);
