DROP TABLE ws_binding_tokens;
DROP TABLE job_cursors;
DROP TABLE subscription_events;
DROP TABLE subscriptions;
