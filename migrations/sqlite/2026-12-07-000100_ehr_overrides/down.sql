ALTER TABLE ehrs DROP COLUMN audit_base;
ALTER TABLE ehrs DROP COLUMN backend_token_url;
