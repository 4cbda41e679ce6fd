-- API keys: shown once at creation, stored as a SHA-256 hash of their secret, found by a
-- visible prefix. A key belongs to one namespace ('*' = every namespace, admin keys only).
CREATE TABLE api_keys (
    id           uuid PRIMARY KEY,
    prefix       text NOT NULL UNIQUE,
    secret_hash  text NOT NULL,
    name         text NOT NULL,
    role         text NOT NULL CHECK (role IN ('admin', 'operator', 'submitter', 'viewer')),
    namespace    text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    revoked_at   timestamptz,
    last_used_at timestamptz,
    use_count    bigint NOT NULL DEFAULT 0,
    CHECK (namespace <> '*' OR role = 'admin')
);
