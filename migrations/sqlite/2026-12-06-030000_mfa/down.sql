DROP TABLE mfa_factors;
DROP TABLE mfa_recovery_codes;
DROP TABLE mfa_guard;
DROP TABLE mfa_tickets;
ALTER TABLE ehrs DROP COLUMN mfa;
ALTER TABLE ehrs DROP COLUMN portal_mfa;
ALTER TABLE ehrs DROP COLUMN mfa_acr;
ALTER TABLE ehr_sessions DROP COLUMN amr;
