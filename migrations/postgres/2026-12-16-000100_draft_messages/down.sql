DROP TABLE draft_messages;
