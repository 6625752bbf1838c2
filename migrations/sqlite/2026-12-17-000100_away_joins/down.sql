DROP TABLE away_joins;
