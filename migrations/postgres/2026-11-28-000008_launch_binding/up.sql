-- A standalone launch is bound to the browser that started it: the SHA-256 of a first-party cookie's
-- value (an EHR launch runs in the EHR's iframe, where that cookie would be a third-party one).
ALTER TABLE launch_states ADD COLUMN browser_hash TEXT;
