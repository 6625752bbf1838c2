DROP TABLE receipts;
DROP TABLE events;
