-- Unique tasks (docs/scheduling.md, "Unique tasks"): a task may carry a uniqueness key, held
-- while the task is active (scope 'active': not deleted, with a next run due or a run open) or
-- until expires_at (scope 'window'). A second task with a held key is not created; the answer
-- names the holder. The primary key makes the check race-free across API replicas: a concurrent
-- claim of the same key waits for the first and then sees it.
CREATE TABLE task_unique_keys (
    namespace  text NOT NULL,
    key        text NOT NULL,
    task_id    uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED,
    scope      text NOT NULL CHECK (scope IN ('active', 'window')),
    expires_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, key)
);
CREATE INDEX task_unique_keys_task ON task_unique_keys (task_id);
