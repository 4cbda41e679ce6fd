-- W3C baggage travels with the trace context: the request that created or triggered a task
-- (tasks.trace_baggage, like tasks.trace_parent used by its next occurrence only) and every
-- attempt of a run (runs.baggage, sent in the task message's `baggage` header).
ALTER TABLE tasks ADD COLUMN trace_baggage text;
ALTER TABLE runs ADD COLUMN baggage text;
