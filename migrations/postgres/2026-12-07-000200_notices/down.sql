DROP TABLE notices;
DROP TABLE notify_prefs;
DROP TABLE notify_contacts;
