ALTER TABLE launch_states DROP COLUMN browser_hash;
