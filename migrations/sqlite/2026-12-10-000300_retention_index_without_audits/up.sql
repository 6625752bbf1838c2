-- Issue 24: the retention purge reads this index for everything but AuditEvents (the audit trail
-- is cut from the start of its hash chain instead: src/compliance/purge.rs), so it no longer
-- holds an entry for each AuditEvent (one per read, search and write).
DROP INDEX resources_retention;
CREATE INDEX resources_retention ON resources (retention_class, last_updated) WHERE res_type <> 'AuditEvent';
