-- Workers leave cleanly (docs/workers.md, "Leaving"): a drained worker's last heartbeat says
-- so, and the worker shows 'stopped' instead of being declared 'lost'.
--   beat_at:    the worker's own time of its latest heartbeat (its `at`): a heartbeat sent before
--               a goodbye but recorded after it (two dispatchers) does not make it active again
--   stopped_at: when its goodbye was recorded (database clock)
-- Stopped and lost workers are deleted after retention.workers_hours (maintenance).
ALTER TABLE workers
    ADD COLUMN beat_at    timestamptz,
    ADD COLUMN stopped_at timestamptz;
