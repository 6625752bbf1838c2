-- Communications saved as drafts (status `preparation`) and not yet sent. A draft is sent by an
-- update out of `preparation`; the notices of a new message (email, SMS, push) are made then, as
-- for a message created as sent. Rows leave when the draft is sent, deleted or erased. Drafts saved
-- before this table existed are not in it: sent, they get no notice (as before).
CREATE TABLE draft_messages (comm_id TEXT PRIMARY KEY NOT NULL);
