-- The Courier tokens issued to a session ("jti:exp" pairs, space-separated), all revoked when it ends.
ALTER TABLE ehr_sessions ADD COLUMN token_jtis TEXT NOT NULL DEFAULT '';
