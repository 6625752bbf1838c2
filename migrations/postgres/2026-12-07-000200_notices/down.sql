DROP TABLE notify_pending_contacts;
DROP TABLE notices;
DROP TABLE notify_prefs;
DROP TABLE notify_contacts;
