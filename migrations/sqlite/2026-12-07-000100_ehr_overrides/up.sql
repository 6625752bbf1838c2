-- Issue 22 (EHR compatibility): a registration may override what discovery finds. The token
-- endpoint of the backend-services connection (SMART Backend Services; NULL: the discovered
-- token endpoint), and the FHIR base that takes Courier's AuditEvents (NULL: the EHR's iss).
ALTER TABLE ehrs ADD COLUMN backend_token_url TEXT;
ALTER TABLE ehrs ADD COLUMN audit_base TEXT;
