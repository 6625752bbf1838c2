-- Issue 24: an AuditEvent's `outcome` of 0 (success, nearly every event) has no index row, its
-- other values keep theirs, and an event without an outcome gets one row with the empty code,
-- so that "no row" means exactly 0 (crates/store/src/search/mod.rs, SPARSE). About 32 bytes per
-- event on SQLite, 130 on PostgreSQL. '12' is `AuditEvent.outcome`'s short key
-- (search/names.rs), and a token without a system is stored with the empty system.
INSERT INTO idx_token (rid, param, system, code)
SELECT r.rid, '12', '', '' FROM resources r
WHERE r.res_type = 'AuditEvent' AND r.deleted = 0
  AND NOT EXISTS (SELECT 1 FROM idx_token t WHERE t.rid = r.rid AND t.param = '12');
DELETE FROM idx_token WHERE param = '12' AND system = '' AND code = '0';
