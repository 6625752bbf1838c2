ALTER TABLE subscriptions DROP COLUMN end_at;
