-- Callback delivery: a callback ends delivered (2xx) or given up (a final refusal, or its
-- attempts used up); the due index holds only the ones still to try.
ALTER TABLE callbacks
    ADD COLUMN failed_at   timestamptz,
    ADD COLUMN last_status int,
    ADD COLUMN created_at  timestamptz NOT NULL DEFAULT now();
DROP INDEX callbacks_due;
CREATE INDEX callbacks_due ON callbacks (next_at) WHERE delivered_at IS NULL AND failed_at IS NULL;
CREATE INDEX callbacks_run ON callbacks (run_id);
