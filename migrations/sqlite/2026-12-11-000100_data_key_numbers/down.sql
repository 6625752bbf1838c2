ALTER TABLE resource_versions ADD COLUMN key_id TEXT NOT NULL DEFAULT '';
UPDATE resource_versions SET key_id = COALESCE((SELECT k.key_id FROM data_keys k WHERE k.n = resource_versions.key_n), '');
DROP INDEX resource_versions_key;
ALTER TABLE resource_versions DROP COLUMN key_n;
CREATE INDEX resource_versions_key ON resource_versions (key_id);
DROP TRIGGER data_keys_number;
DROP INDEX data_keys_n;
ALTER TABLE data_keys DROP COLUMN n;
