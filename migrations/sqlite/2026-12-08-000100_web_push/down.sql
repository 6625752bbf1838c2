ALTER TABLE notify_contacts DROP COLUMN bounced_at;
ALTER TABLE notify_prefs DROP COLUMN language_chosen;
ALTER TABLE notify_prefs DROP COLUMN language;
DROP TABLE notify_vapid;
DROP TABLE notify_push;
