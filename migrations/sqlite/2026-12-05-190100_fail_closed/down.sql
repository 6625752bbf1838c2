ALTER TABLE ws_binding_tokens DROP COLUMN jti;
ALTER TABLE schedules DROP COLUMN claimed_by;
DROP TABLE write_probe;
