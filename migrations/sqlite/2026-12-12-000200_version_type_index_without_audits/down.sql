DROP INDEX resource_versions_type;
CREATE INDEX resource_versions_type ON resource_versions (res_type, vid);
