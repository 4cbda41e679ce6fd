-- Structured results (docs/scheduling.md, "Results"): what an executor returned, as JSON, at
-- most 32 KiB (conveyor.status.v1's optional `result`).
ALTER TABLE runs ADD COLUMN result jsonb;

-- Backfills run one at a time (overlap queue, docs/scheduling.md, "Backfill"): the runs of one
-- backfill share an id; each waits ('infinity') until the occurrence before it has ended.
ALTER TABLE runs ADD COLUMN backfill_id uuid;
CREATE INDEX runs_backfill_waiting ON runs (backfill_id, occurrence)
    WHERE backfill_id IS NOT NULL AND state = 'scheduled' AND available_at = 'infinity';
