DROP TABLE away_handled;
