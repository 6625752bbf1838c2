ALTER TABLE ehrs DROP COLUMN trusted_systems;
