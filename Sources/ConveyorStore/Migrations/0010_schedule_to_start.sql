-- Schedule-to-start timeout (docs/reliability.md, "Runs that never start"): a run published to
-- the broker must start within its task's schedule_to_start_seconds. Past it (plus the
-- dispatcher's lost grace), the dispatcher ends it 'expired' and retries it by policy; workers
-- refuse a task message past its start_by time, so an expired attempt never starts.
ALTER TABLE tasks
    ADD COLUMN schedule_to_start_seconds double precision NOT NULL DEFAULT 3600
        CHECK (schedule_to_start_seconds > 0 AND schedule_to_start_seconds <= 604800);

ALTER TABLE runs DROP CONSTRAINT runs_state_check;
ALTER TABLE runs
    ADD CONSTRAINT runs_state_check CHECK (state IN ('scheduled', 'queued', 'dispatched', 'running', 'succeeded',
                                                     'failed', 'timed_out', 'cancelled', 'lost', 'dead', 'skipped',
                                                     'expired'));

-- deadline_at now also holds a dispatched run's start deadline (dispatched_at + schedule to
-- start + grace); runs dispatched by the previous version get one from the default.
UPDATE runs SET deadline_at = dispatched_at + interval '3630 seconds'
WHERE state = 'dispatched' AND deadline_at IS NULL AND dispatched_at IS NOT NULL;
CREATE INDEX runs_start_deadline ON runs (deadline_at) WHERE state = 'dispatched';
