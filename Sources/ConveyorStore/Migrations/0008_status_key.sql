-- The dispatchers' shared secret for status proofs (docs/architecture.md, "Status proof"): each
-- task message carries HMAC-SHA256(secret, run id, attempt), and a status changes a run only when
-- it presents that value. 32 bytes, 244 of them random (two version-4 UUIDs). Dispatchers read it
-- at start; workers and the API never need it. Rotation: docs/operations.md.
CREATE TABLE status_keys (
    id smallint PRIMARY KEY CHECK (id = 1),
    secret bytea NOT NULL CHECK (length(secret) = 32),
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO status_keys (id, secret)
VALUES (1, decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'));
