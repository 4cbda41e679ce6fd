-- Worker fleet: heartbeats record what each worker holds; a worker silent for a few of its
-- intervals is declared lost, and the runs it had detached from the broker are retried.
ALTER TABLE workers
    ADD COLUMN in_flight             uuid[] NOT NULL DEFAULT '{}',
    ADD COLUMN heartbeat_interval_ms int NOT NULL DEFAULT 5000,
    ADD COLUMN first_seen            timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN lost_at               timestamptz;
CREATE INDEX workers_active ON workers (last_heartbeat) WHERE state = 'active';

-- A detached run's task message was acknowledged when it became long (worker.detach_after_ms):
-- the broker will not redeliver it, so the dispatcher recovers it when its worker is lost.
ALTER TABLE runs ADD COLUMN detached boolean NOT NULL DEFAULT false;
CREATE INDEX runs_running_by_worker ON runs (worker_id) WHERE state = 'running';
