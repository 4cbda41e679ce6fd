-- Conveyor schema v1: tasks, runs, workers. See docs/architecture.md.

CREATE TABLE tasks (
    id              uuid PRIMARY KEY,
    namespace       text NOT NULL DEFAULT 'default',
    name            text NOT NULL,
    executor        text NOT NULL,
    parameters      jsonb NOT NULL DEFAULT '{}'::jsonb,
    schedule        text NOT NULL,                       -- 'every 30s' | 'once' (cron: next migration)
    timezone        text NOT NULL DEFAULT 'UTC',
    misfire_policy  text NOT NULL DEFAULT 'once',
    queue           text NOT NULL DEFAULT 'default',
    priority        smallint NOT NULL DEFAULT 2,
    timeout_seconds double precision NOT NULL DEFAULT 300 CHECK (timeout_seconds > 0),
    max_attempts    int NOT NULL DEFAULT 1 CHECK (max_attempts >= 1),
    retry_policy    jsonb NOT NULL DEFAULT '{}'::jsonb,
    overlap_policy  text NOT NULL DEFAULT 'allow',
    group_name      text,
    labels          jsonb NOT NULL DEFAULT '{}'::jsonb,
    paused          boolean NOT NULL DEFAULT false,
    next_run_at     timestamptz,
    shard           int NOT NULL,                        -- stable hash of id: the task group is shard % G
    trace_parent    text,                                -- context of the request that created or triggered it
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    deleted_at      timestamptz
);
CREATE UNIQUE INDEX tasks_name ON tasks (namespace, name) WHERE deleted_at IS NULL;
-- The scan: due tasks only. Tasks not due cost nothing.
CREATE INDEX tasks_due ON tasks (next_run_at) WHERE NOT paused AND deleted_at IS NULL AND next_run_at IS NOT NULL;

CREATE TABLE runs (
    id              uuid PRIMARY KEY,
    task_id         uuid NOT NULL REFERENCES tasks (id),
    occurrence      timestamptz NOT NULL,
    attempt         int NOT NULL CHECK (attempt >= 1),
    state           text NOT NULL CHECK (state IN ('scheduled', 'queued', 'dispatched', 'running', 'succeeded',
                                                   'failed', 'timed_out', 'cancelled', 'lost', 'dead')),
    queue           text NOT NULL,
    shard           int NOT NULL,
    -- scheduled: when it may be dispatched; queued: when another dispatcher may republish it (outbox lease)
    available_at    timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    dispatched_at   timestamptz,
    started_at      timestamptz,
    finished_at     timestamptz,
    worker_id       text,
    exit_code       int,
    output          text,
    error_class     text,
    error_message   text,
    trace_id        text,
    traceparent     text,
    publish_count   int NOT NULL DEFAULT 0,
    UNIQUE (task_id, occurrence, attempt)
);
-- The outbox and retry scan: runs waiting to be (re)published.
CREATE INDEX runs_due ON runs (available_at) WHERE state IN ('scheduled', 'queued');
CREATE INDEX runs_by_task ON runs (task_id, occurrence DESC);
CREATE INDEX runs_active ON runs (state) WHERE state IN ('dispatched', 'running');

CREATE TABLE workers (
    id              text PRIMARY KEY,
    host            text NOT NULL,
    queues          text[] NOT NULL,
    executors       text[] NOT NULL,
    concurrency     int NOT NULL,
    last_heartbeat  timestamptz NOT NULL,
    state           text NOT NULL DEFAULT 'active'
);

-- Wake dispatchers at once when something becomes due now (new task, trigger, retry).
CREATE FUNCTION conveyor_notify_due() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.next_run_at IS NOT NULL AND NEW.next_run_at <= now() AND NOT NEW.paused THEN
        PERFORM pg_notify('conveyor_due', '');
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER tasks_notify_due AFTER INSERT OR UPDATE OF next_run_at, paused ON tasks
    FOR EACH ROW EXECUTE FUNCTION conveyor_notify_due();
