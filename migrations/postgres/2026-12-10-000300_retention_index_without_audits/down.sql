DROP INDEX resources_retention;
CREATE INDEX resources_retention ON resources (retention_class, last_updated);
