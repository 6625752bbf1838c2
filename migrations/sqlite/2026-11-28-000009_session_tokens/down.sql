ALTER TABLE ehr_sessions DROP COLUMN token_jtis;
