-- Subscription.end (FHIR R4: "the time for the server to turn the subscription off"), in
-- microseconds; NULL: no end. The dispatcher turns a subscription past its end off.
ALTER TABLE subscriptions ADD COLUMN end_at BIGINT;
