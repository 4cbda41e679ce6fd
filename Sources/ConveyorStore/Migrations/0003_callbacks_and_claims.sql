-- Callback delivery: a callback ends delivered (2xx) or given up (a final refusal, or its
-- attempts used up); the due index holds only the ones still to try.
ALTER TABLE callbacks
    ADD COLUMN failed_at   timestamptz,
    ADD COLUMN last_status int,
    ADD COLUMN created_at  timestamptz NOT NULL DEFAULT now();
DROP INDEX callbacks_due;
CREATE INDEX callbacks_due ON callbacks (next_at) WHERE delivered_at IS NULL AND failed_at IS NULL;
CREATE INDEX callbacks_run ON callbacks (run_id);

-- The due NOTIFY fires only for rows that are due now: the trigger's WHEN is checked when the
-- event is queued, so advancing next_run_at on thousands of materialized tasks no longer calls
-- the function once per row. The condition lives in the WHEN alone.
CREATE OR REPLACE FUNCTION conveyor_notify_due() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('conveyor_due', '');
    RETURN NULL;
END $$;
DROP TRIGGER tasks_notify_due ON tasks;
CREATE TRIGGER tasks_notify_due AFTER INSERT OR UPDATE OF next_run_at, paused ON tasks
    FOR EACH ROW WHEN (NEW.next_run_at IS NOT NULL AND NEW.next_run_at <= now() AND NOT NEW.paused)
    EXECUTE FUNCTION conveyor_notify_due();
