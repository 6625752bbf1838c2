DROP TABLE notify_vapid;
DROP TABLE notify_push;
