-- Idempotency-Key on POST /v1/tasks and trigger (docs/api.md, "Idempotency-Key"): the first
-- answer to a key is kept 24 hours and replayed to a retry with the same key, which creates
-- nothing. status is NULL while the first request is in progress.
CREATE TABLE idempotency_keys (
    namespace    text NOT NULL,
    key          text NOT NULL,
    route        text NOT NULL,
    request_hash text NOT NULL,
    status       int,
    body         text,
    batch_id     text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
