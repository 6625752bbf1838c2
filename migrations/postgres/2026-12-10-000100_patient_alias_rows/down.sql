-- The `patient` rows again, from their bases' rows of type Patient: '39' Communication.subject,
-- '58' CommunicationRequest.subject, '3' AuditEvent.agent and '8' AuditEvent.entity.
INSERT INTO idx_ref (rid, param, target_type, target_id, url, at_lo, at_hi)
SELECT DISTINCT rid, CASE param WHEN '39' THEN '32' WHEN '58' THEN '51' ELSE '13' END,
    target_type, target_id, url, at_lo, at_hi
FROM idx_ref WHERE param IN ('39', '58', '3', '8') AND target_type = 'Patient';
