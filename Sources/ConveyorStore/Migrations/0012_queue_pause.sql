-- Paused queues (docs/operations.md, "Pausing and draining a queue"): dispatchers publish nothing
-- new to a paused queue; its runs wait in PostgreSQL, in priority and due order, until resumed.
-- Runs already published keep running.
CREATE TABLE queue_pauses (
    queue      text PRIMARY KEY,
    paused_at  timestamptz NOT NULL DEFAULT now(),
    paused_by  text NOT NULL
);
