-- Due tasks of a full queue wait for room as tasks (docs/architecture.md, "Due tasks wait for
-- room as tasks"), instead of each becoming a `scheduled` run that a later claim rewrites `queued`.
--
-- tasks_waiting: a waiting queue's due tasks by priority, then due time, read when the queue has
-- room (one index range per priority, from the last task taken, that stops at the room).
-- tasks_due gains the id, so that a claim's walk of the due tasks goes on from where the last one
-- stopped, even among thousands due at one instant. Both carry the shard, which each task group
-- filters on: the other groups' entries are skipped in the index, without reading their rows.
--
-- Both are built while the table is locked against writes: on a large tasks table, apply this
-- migration at a quiet moment (docs/operations.md, "Upgrading").

CREATE INDEX tasks_waiting ON tasks (queue, priority, next_run_at, id, shard)
    WHERE NOT paused AND deleted_at IS NULL AND next_run_at IS NOT NULL;
DROP INDEX tasks_due;
CREATE INDEX tasks_due ON tasks (next_run_at, id, shard)
    WHERE NOT paused AND deleted_at IS NULL AND next_run_at IS NOT NULL;
