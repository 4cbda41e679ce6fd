-- Conveyor schema v2: scheduling semantics (docs/scheduling.md, docs/architecture.md).

ALTER TABLE tasks
    ADD COLUMN max_catchup        int NOT NULL DEFAULT 10 CHECK (max_catchup BETWEEN 1 AND 10000),
    ADD COLUMN concurrency_key    text,
    ADD COLUMN concurrency_limit  int CHECK (concurrency_limit >= 1),
    ADD COLUMN trigger_rule       text NOT NULL DEFAULT 'all_success',
    ADD COLUMN callback_url       text,
    ADD COLUMN skipped_occurrences bigint NOT NULL DEFAULT 0,
    ADD COLUMN anchor_at          timestamptz;            -- interval schedules: the grid's origin

-- A dependent runs when its upstreams end, in the same workflow run.
CREATE TABLE task_dependencies (
    task_id     uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    upstream_id uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    PRIMARY KEY (task_id, upstream_id),
    CHECK (task_id <> upstream_id)
);
CREATE INDEX task_dependencies_upstream ON task_dependencies (upstream_id);

-- One execution of a DAG: started by an occurrence of its root task.
CREATE TABLE workflow_runs (
    id           uuid PRIMARY KEY,
    root_task_id uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    occurrence   timestamptz NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE runs DROP CONSTRAINT runs_state_check;
ALTER TABLE runs
    ADD CONSTRAINT runs_state_check CHECK (state IN ('scheduled', 'queued', 'dispatched', 'running', 'succeeded',
                                                     'failed', 'timed_out', 'cancelled', 'lost', 'dead', 'skipped')),
    ADD COLUMN priority        smallint NOT NULL DEFAULT 2,
    ADD COLUMN concurrency_key text,
    ADD COLUMN deadline_at     timestamptz,          -- running: declared lost after this (timeout + grace)
    ADD COLUMN workflow_run_id uuid,
    ADD COLUMN reason          text,                 -- why Conveyor ended it (dead, lost, skipped, cancelled)
    ADD COLUMN cancel_pending  boolean NOT NULL DEFAULT false;  -- cancelled; workers not told yet

-- The claim: ready runs by priority, then due time. Waiting runs (overlap 'queue') have
-- available_at = 'infinity' and are never ready until released.
DROP INDEX runs_due;
-- Every index a run's row versions touch costs on each state change (no HOT updates: state is in
-- the partial predicates). runs_active is read by nothing now; the unique (task_id, occurrence,
-- attempt) index serves "runs of a task, newest first" by a backward scan.
DROP INDEX runs_active;
DROP INDEX runs_by_task;
CREATE INDEX runs_ready ON runs (priority, available_at) WHERE state = 'scheduled';
CREATE INDEX runs_lease ON runs (available_at) WHERE state = 'queued';
CREATE INDEX runs_deadline ON runs (deadline_at) WHERE state = 'running';
CREATE INDEX runs_open_by_task ON runs (task_id) WHERE state IN ('scheduled', 'queued', 'dispatched', 'running');
CREATE INDEX runs_open_by_key ON runs (concurrency_key)
    WHERE concurrency_key IS NOT NULL AND state IN ('queued', 'dispatched', 'running');
CREATE INDEX runs_backlog ON runs (queue) WHERE state IN ('queued', 'dispatched');
CREATE INDEX runs_workflow ON runs (workflow_run_id, task_id) WHERE workflow_run_id IS NOT NULL;
CREATE INDEX runs_cancel_pending ON runs (id) WHERE cancel_pending;
CREATE INDEX runs_finished ON runs (finished_at) WHERE finished_at IS NOT NULL;

-- Per-queue rate limits (token buckets shared by every dispatcher).
CREATE TABLE queue_limits (
    queue           text PRIMARY KEY,
    rate_per_second double precision NOT NULL CHECK (rate_per_second > 0),
    burst           double precision NOT NULL CHECK (burst >= 1),
    tokens          double precision NOT NULL,
    refilled_at     timestamptz NOT NULL DEFAULT now()
);

-- Messages the broker dead-lettered, kept for inspection and re-drive.
CREATE TABLE dead_letters (
    id          bigserial PRIMARY KEY,
    run_id      uuid,
    reason      text NOT NULL,
    source      text NOT NULL,                        -- the queue it died in
    type        text,
    body        text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dead_letters_run ON dead_letters (run_id);

-- Callbacks: outcome notifications delivered by the dispatcher, with their own retries.
CREATE TABLE callbacks (
    id           bigserial PRIMARY KEY,
    run_id       uuid NOT NULL,
    url          text NOT NULL,
    payload      text NOT NULL,
    attempts     int NOT NULL DEFAULT 0,
    next_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at timestamptz,
    last_error   text
);
CREATE INDEX callbacks_due ON callbacks (next_at) WHERE delivered_at IS NULL;

-- Resuming a paused task, or creating one due now, wakes the dispatchers (as before).
