-- Run handles (docs/api.md, "GET /v1/runs/{id}"): the id a task's next run will have, returned
-- by creating and triggering the task before any dispatcher makes the run. The dispatcher uses
-- it for the first run it makes from the task's next due time, then draws the next one.
ALTER TABLE tasks ADD COLUMN next_run_id uuid;
UPDATE tasks SET next_run_id = gen_random_uuid() WHERE next_run_at IS NOT NULL AND deleted_at IS NULL;
CREATE UNIQUE INDEX tasks_next_run_id ON tasks (next_run_id) WHERE next_run_id IS NOT NULL;
