-- Issue 24: AuditEvents leave the (res_type, vid) index of versions, as they left resources_retention
-- (2026-12-10-000300): AuditEvents are most of the versions, so their type history (vid order,
-- newest first) reads the versions' own key and finds them densely; every other type's history
-- names the index's condition (crates/store/src/store/mod.rs, history).
DROP INDEX resource_versions_type;
CREATE INDEX resource_versions_type ON resource_versions (res_type, vid) WHERE res_type <> 'AuditEvent';
