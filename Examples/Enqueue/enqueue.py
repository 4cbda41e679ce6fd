#!/usr/bin/env python3
"""Enqueue Conveyor work inside your application's own PostgreSQL transaction (psycopg 3).

The task exists if and only if your transaction commits: roll back, and there is nothing to run.

    python3 enqueue.py --dsn postgresql://app@db/conveyor --order 42 [--rollback]

Your role needs `conveyor enqueue-grant ROLE --namespace default` (run once by Conveyor's owner);
it needs no privilege on any table. Errors name the field: `name: 1 to 200 characters, no spaces`
(SQLSTATE 22023; psycopg gives the field in `e.diag.column_name`).
"""
import argparse
import json
import sys

import psycopg


def enqueue(cur, name, executor, parameters, **options):
    """Adds a one-off task in the transaction `cur` is in; returns (task_id, run_id)."""
    named = ", ".join(f"{k} => %({k})s" for k in options)
    cur.execute(
        "SELECT task_id, run_id FROM conveyor_enqueue(name => %(name)s, executor => %(executor)s, "
        "parameters => %(parameters)s::jsonb" + (", " + named if named else "") + ")",
        {"name": name, "executor": executor, "parameters": json.dumps(parameters), **options})
    return cur.fetchone()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dsn", required=True)
    p.add_argument("--order", required=True)
    p.add_argument("--executor", default="noop")
    p.add_argument("--queue", default="default")
    p.add_argument("--rollback", action="store_true", help="roll the transaction back: nothing is enqueued")
    a = p.parse_args()
    with psycopg.connect(a.dsn) as conn:
        try:
            with conn.transaction() as tx:
                with conn.cursor() as cur:
                    # Your own writes go here, in the same transaction, e.g.
                    # cur.execute("UPDATE orders SET state = 'paid' WHERE id = %s", (a.order,))
                    task_id, run_id = enqueue(
                        cur, f"ship-order-{a.order}", a.executor, {"order": a.order}, queue=a.queue, max_attempts=3)
                    if a.rollback:
                        raise psycopg.Rollback(tx)
            print(json.dumps({"task_id": str(task_id), "run_id": str(run_id), "committed": not a.rollback}))
        except psycopg.errors.InvalidParameterValue as e:
            print(f"refused: {e.diag.message_primary} (field {e.diag.column_name})", file=sys.stderr)
            sys.exit(2)


if __name__ == "__main__":
    main()
