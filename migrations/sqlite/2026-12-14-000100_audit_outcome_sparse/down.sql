-- Undoes 2026-12-14-000100: every live AuditEvent without an outcome row gets its row for 0,
-- and the empty code's rows ("no outcome") go.
INSERT INTO idx_token (rid, param, system, code)
SELECT r.rid, '12', '', '0' FROM resources r
WHERE r.res_type = 'AuditEvent' AND r.deleted = 0
  AND NOT EXISTS (SELECT 1 FROM idx_token t WHERE t.rid = r.rid AND t.param = '12');
DELETE FROM idx_token WHERE param = '12' AND system = '' AND code = '';
