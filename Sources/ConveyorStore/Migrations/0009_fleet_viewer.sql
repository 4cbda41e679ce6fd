-- A viewer key may be for every namespace ('*'): read-only across tenants, for fleet dashboards
-- and Prometheus, which need the fleet-wide routes (docs/api.md, "Scope") without an admin key.
-- It only relaxes a check: the previous version keeps working against it.
ALTER TABLE api_keys DROP CONSTRAINT IF EXISTS api_keys_check;
ALTER TABLE api_keys ADD CONSTRAINT api_keys_namespace_all CHECK (namespace <> '*' OR role IN ('admin', 'viewer'));
