-- Moves the AuditEvents back into the generic tables. Only events with a stored id can go back
-- (those up.sql moved, when nothing was written since): a newer event's id is derived from its
-- `rid` by a key SQL does not hold, so its NULL `fhir_id` fails `resources.fhir_id NOT NULL` and
-- this migration with it, rather than losing the event.
INSERT INTO resources (res_type, fhir_id, version_id, last_updated, deleted, retention_class)
SELECT 'AuditEvent', fhir_id, 1, last_updated, 0, 'audit' FROM audit_events ORDER BY rid;
INSERT INTO resource_versions (vid, rid, res_type, version_id, last_updated, method, deleted, body, key_n)
SELECT a.rid, r.rid, 'AuditEvent', 1, a.last_updated, 'POST', 0, a.body, a.key_n
FROM audit_events a JOIN resources r ON r.res_type = 'AuditEvent' AND r.fhir_id = a.fhir_id;
INSERT INTO idx_ref (rid, param, n, target_type, target_id, url, at_lo, at_hi)
SELECT r.rid, x.param, ROW_NUMBER() OVER (PARTITION BY x.rid ORDER BY x.param, x.target_id, x.target_type) - 1,
       CASE WHEN x.target_type = '/' THEN NULL ELSE NULLIF(x.target_type, '') END,
       CASE WHEN x.target_type = '/' THEN NULL ELSE NULLIF(x.target_id, '') END,
       CASE WHEN x.target_type = '/' THEN x.target_id END,
       a.at_lo, a.at_hi
FROM audit_refs x JOIN audit_events a ON a.rid = x.rid
JOIN resources r ON r.res_type = 'AuditEvent' AND r.fhir_id = a.fhir_id;
INSERT INTO idx_token (rid, param, code, system)
SELECT r.rid, t.param, t.code, t.system
FROM audit_tokens t JOIN audit_events a ON a.rid = t.rid
JOIN resources r ON r.res_type = 'AuditEvent' AND r.fhir_id = a.fhir_id;
INSERT INTO idx_date (rid, param, lo, hi)
SELECT r.rid, '7', a.at_lo, a.at_hi
FROM audit_events a JOIN resources r ON r.res_type = 'AuditEvent' AND r.fhir_id = a.fhir_id
WHERE a.at_lo IS NOT NULL;
DROP TABLE audit_tokens;
DROP TABLE audit_refs;
DROP TABLE audit_events;
