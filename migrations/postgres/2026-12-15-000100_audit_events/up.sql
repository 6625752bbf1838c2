-- Issue 24: an AuditEvent is one row of its own instead of a resource head, a version row and
-- generic index rows (crates/store/src/store/audit_rows.rs). Its `rid` is its place in the audit
-- trail: the existing events keep their version row's number (`vid`), which the audit chain's
-- links name and hash, so the chain verifies unchanged. `fhir_id` is stored for the events moved
-- here; a new event's id is derived from its `rid` (NULL here). Its date (`recorded`) is two
-- columns, its references one row each in `audit_refs` (one copy, keyed for lookup: an absolute
-- reference has the type '/' and its URL as the id), its outcome other than 0 a row in
-- `audit_tokens` (search::SPARSE). Short keys (search/names.rs): '7' is `AuditEvent.date`.
CREATE TABLE audit_events (
    rid          BIGSERIAL PRIMARY KEY,
    fhir_id      TEXT,
    last_updated BIGINT NOT NULL,
    at_lo        BIGINT,
    at_hi        BIGINT,
    key_n        BIGINT NOT NULL,
    body         BYTEA NOT NULL
);
CREATE UNIQUE INDEX audit_events_id ON audit_events (fhir_id) WHERE fhir_id IS NOT NULL;
CREATE INDEX audit_events_at ON audit_events (at_hi);
CREATE INDEX audit_events_key ON audit_events (key_n);

CREATE TABLE audit_refs (
    param       TEXT NOT NULL,
    target_id   TEXT NOT NULL,
    target_type TEXT NOT NULL,
    at_hi       BIGINT NOT NULL,
    rid         BIGINT NOT NULL,
    PRIMARY KEY (param, target_id, target_type, at_hi, rid)
);

CREATE TABLE audit_tokens (
    rid    BIGINT NOT NULL,
    param  TEXT NOT NULL,
    code   TEXT NOT NULL,
    system TEXT NOT NULL,
    PRIMARY KEY (rid, param, code, system)
);
CREATE INDEX audit_tokens_lookup ON audit_tokens (param, code, system, rid);

INSERT INTO audit_events (rid, fhir_id, last_updated, at_lo, at_hi, key_n, body)
SELECT v.vid, r.fhir_id, v.last_updated,
       (SELECT MIN(d.lo) FROM idx_date d WHERE d.rid = r.rid AND d.param = '7'),
       (SELECT MAX(d.hi) FROM idx_date d WHERE d.rid = r.rid AND d.param = '7'),
       v.key_n, v.body
FROM resources r JOIN resource_versions v ON v.rid = r.rid AND v.version_id = r.version_id
WHERE r.res_type = 'AuditEvent' AND v.res_type = 'AuditEvent' AND r.deleted = 0;
-- A new event's row never takes a number the chain already names (a link whose row was not
-- moved: deleted or re-typed by hand), nor one of a moved event.
SELECT setval(pg_get_serial_sequence('audit_events', 'rid'),
              GREATEST(COALESCE((SELECT MAX(rid) FROM audit_events), 0), COALESCE((SELECT MAX(vid) FROM audit_chain), 0)) + 1,
              false);

INSERT INTO audit_refs (param, target_id, target_type, at_hi, rid)
SELECT DISTINCT x.param,
       CASE WHEN x.url IS NOT NULL THEN x.url ELSE COALESCE(x.target_id, '') END,
       CASE WHEN x.url IS NOT NULL THEN '/' ELSE COALESCE(x.target_type, '') END,
       COALESCE(x.at_hi, 0), v.vid
FROM idx_ref x JOIN resources r ON r.rid = x.rid
JOIN resource_versions v ON v.rid = r.rid AND v.version_id = r.version_id
WHERE r.res_type = 'AuditEvent' AND r.deleted = 0;

INSERT INTO audit_tokens (rid, param, code, system)
SELECT DISTINCT v.vid, t.param, t.code, t.system
FROM idx_token t JOIN resources r ON r.rid = t.rid
JOIN resource_versions v ON v.rid = r.rid AND v.version_id = r.version_id
WHERE r.res_type = 'AuditEvent' AND r.deleted = 0;

DELETE FROM idx_ref WHERE rid IN (SELECT rid FROM resources WHERE res_type = 'AuditEvent');
DELETE FROM idx_token WHERE rid IN (SELECT rid FROM resources WHERE res_type = 'AuditEvent');
DELETE FROM idx_date WHERE rid IN (SELECT rid FROM resources WHERE res_type = 'AuditEvent');
DELETE FROM idx_string WHERE rid IN (SELECT rid FROM resources WHERE res_type = 'AuditEvent');
DELETE FROM resource_versions WHERE rid IN (SELECT rid FROM resources WHERE res_type = 'AuditEvent');
DELETE FROM resources WHERE res_type = 'AuditEvent';
