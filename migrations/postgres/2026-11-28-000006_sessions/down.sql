DROP TABLE ehr_sessions;
