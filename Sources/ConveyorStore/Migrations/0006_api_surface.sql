-- What the API needs beyond tasks and runs: each task's definition as submitted (PATCH merges
-- into it), batches, templates, and the audit log.
ALTER TABLE tasks
    ADD COLUMN spec     jsonb,        -- the definition, normalised (no start/after); NULL only before 0006
    ADD COLUMN batch_id uuid;         -- set when created in one POST of several tasks
CREATE INDEX tasks_batch ON tasks (batch_id) WHERE batch_id IS NOT NULL;

-- Tasks created before this migration get a spec built from their columns.
UPDATE tasks t SET spec = jsonb_strip_nulls(jsonb_build_object(
    'name', t.name, 'executor', t.executor, 'parameters', t.parameters, 'schedule', t.schedule, 'timezone', t.timezone,
    'misfire', t.misfire_policy, 'max_catchup', t.max_catchup, 'queue', t.queue, 'priority', t.priority,
    'timeout', t.timeout_seconds, 'retry', t.retry_policy || jsonb_build_object('max_attempts', t.max_attempts),
    'overlap', t.overlap_policy,
    'concurrency', CASE WHEN t.concurrency_key IS NOT NULL
                        THEN jsonb_build_object('key', t.concurrency_key, 'limit', t.concurrency_limit) END,
    'group', t.group_name, 'labels', t.labels, 'trigger_rule', t.trigger_rule, 'callback_url', t.callback_url,
    'depends_on', (SELECT jsonb_agg(u.name ORDER BY u.name) FROM task_dependencies d JOIN tasks u ON u.id = d.upstream_id
                   WHERE d.task_id = t.id)))
WHERE t.spec IS NULL;

-- Templates: a task body with {{placeholders}}; POST /v1/templates/{name}/tasks fills them in.
CREATE TABLE task_templates (
    namespace   text NOT NULL,
    name        text NOT NULL,
    body        jsonb NOT NULL,
    parameters  text[] NOT NULL,       -- the placeholders the body uses, each required
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, name)
);

-- Who did what, when, from where. Written right after the change commits (a failure to write
-- it is logged as an error with the request id; the change stands).
CREATE TABLE audit_log (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,         -- API key prefix, or 'jwt:<sub>'
    role        text NOT NULL,
    namespace   text NOT NULL,         -- the namespace acted in
    action      text NOT NULL,         -- task.create, task.update, run.cancel, key.revoke, ...
    target      text NOT NULL,
    request_id  text NOT NULL,
    client      text,                  -- the client address (forwarded only from trusted proxies)
    detail      jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX audit_log_at ON audit_log (at DESC, id DESC);

-- Task pages in byte order of names: a name prefix (LIKE 'abc%') becomes an index range in any
-- database collation, and a page stops after its last row.
CREATE INDEX tasks_name_c ON tasks (namespace, (name COLLATE "C")) WHERE deleted_at IS NULL;

-- Listing runs newest first, across tasks, without sorting the table.
CREATE INDEX runs_by_occurrence ON runs (occurrence DESC, id DESC);
