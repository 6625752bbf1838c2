DROP TABLE care_team_members;
DROP TABLE person_summaries;
