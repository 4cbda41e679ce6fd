#!/usr/bin/env python3
"""A client generated from openapi.yaml by a program nobody here wrote drives a real API.

    python3 scripts/openapi_client_session.py --spec Sources/ConveyorAPI/openapi.yaml \
        --url http://127.0.0.1:8080 --key-file KEYFILE --queue work --workdir /tmp/x

1. Checks the document against the OpenAPI 3.1 schema (openapi-spec-validator).
2. Generates a Python client with openapi-python-client; any warning fails (a warning means a
   part of the document the generator could not turn into code).
3. Imports it and runs a session as an application would: create (with an Idempotency-Key, and
   its replay), patch, list with paging, trigger, wait on the run handle, list runs, start a long
   run and cancel it, and read typed errors (404, 409) by their problem type.

The API needs a worker with the shell executor allowing /bin/echo and /bin/sleep on --queue.
Prints one line per step; exits 1 naming the first step that failed.
"""
import argparse
import importlib
import json
import os
import subprocess
import sys
import time
import uuid

# application/yaml (GET /openapi.yaml) is text to a client; the generator only knows text/plain.
CONFIG = "content_type_overrides:\n  application/yaml: text/plain\n"


def fail(step, detail):
    print(f"FAIL {step}: {detail}")
    sys.exit(1)


def check(step, condition, detail=""):
    if not condition:
        fail(step, detail)
    print(f"ok   {step}")


def generate(spec, workdir):
    import yaml
    from openapi_spec_validator import validate

    with open(spec) as f:
        validate(yaml.safe_load(f))
    print("ok   the document is valid OpenAPI 3.1 (openapi-spec-validator)")
    config = os.path.join(workdir, "generator.yaml")
    with open(config, "w") as f:
        f.write(CONFIG)
    out = os.path.join(workdir, "conveyor_client")
    r = subprocess.run(
        [sys.executable, "-m", "openapi_python_client", "generate", "--path", spec, "--output-path", out,
         "--meta", "none", "--config", config, "--overwrite"],
        capture_output=True, text=True)
    text = r.stdout + r.stderr
    if r.returncode != 0 or "Warning" in text or "WARNING" in text:
        fail("generate", f"openapi-python-client exit {r.returncode}:\n{text}")
    print("ok   openapi-python-client generated a client without a warning")
    sys.path.insert(0, workdir)
    return importlib.import_module("conveyor_client")


def session(pkg, url, key, queue, spec):
    client_mod = importlib.import_module("conveyor_client.client")
    models = importlib.import_module("conveyor_client.models")

    def api(tag, op):
        return importlib.import_module(f"conveyor_client.api.{tag}.{op}")

    client = client_mod.AuthenticatedClient(base_url=url, token=key, timeout=70.0)
    import yaml
    served = api("health", "get_open_api_document").sync(client=client)
    with open(spec) as f:
        check("the document the API serves is this one", yaml.safe_load(served) == yaml.safe_load(f))
    name = "generated-" + uuid.uuid4().hex[:8]

    # Create, with an Idempotency-Key; the replay answers the same task and creates nothing.
    body = models.NewTask(
        name=name, executor="shell", queue=queue, schedule="manual",
        parameters=models.NewTaskParameters.from_dict({"argv": ["/bin/echo", "generated client"]}),
        retry=models.RetryPolicy(max_attempts=2, retry_on=["timeout", "http:5xx"]))
    idem = str(uuid.uuid4())
    created = api("tasks", "create_tasks").sync_detailed(client=client, body=body, idempotency_key=idem)
    task = created.parsed
    check("create: 201 and a typed Task", created.status_code == 201 and isinstance(task, models.Task)
          and task.name == name, f"{created.status_code} {created.content[:300]!r}")
    replay = api("tasks", "create_tasks").sync_detailed(client=client, body=body, idempotency_key=idem)
    check("create replayed with the same Idempotency-Key: the first answer",
          replay.status_code == 201 and replay.parsed.id == task.id
          and replay.headers.get("Idempotent-Replayed") == "true", f"{replay.status_code} {replay.content[:300]!r}")
    again = api("tasks", "create_tasks").sync_detailed(client=client, body=body)
    check("create again without a key: 409, problem type conflict",
          again.status_code == 409 and isinstance(again.parsed, models.Problem)
          and again.parsed.type_ == models.ProblemType.URNCONVEYORPROBLEMCONFLICT,
          f"{again.status_code} {again.content[:300]!r}")

    # A batch: the other shape of the same operation's body and answer.
    batch = api("tasks", "create_tasks").sync_detailed(client=client, body=models.TaskBatch(tasks=[
        models.NewTask(name=name + "-b1", executor="noop", schedule="manual"),
        models.NewTask(name=name + "-b2", executor="noop", schedule="manual")]))
    check("create a batch: a typed BatchCreated", batch.status_code == 201
          and isinstance(batch.parsed, models.BatchCreated) and batch.parsed.count == 2,
          f"{batch.status_code} {batch.content[:300]!r}")

    patched = api("tasks", "update_task").sync_detailed(
        client=client, name=name, body=models.TaskPatch(timeout=90, group="generated"))
    check("patch: the task as it is now", patched.status_code == 200 and patched.parsed.timeout == 90
          and patched.parsed.group == "generated", f"{patched.status_code} {patched.content[:300]!r}")

    page = api("tasks", "list_tasks").sync(client=client, prefix=name, limit=1)
    check("list tasks: one per page and a cursor", len(page.tasks) == 1 and isinstance(page.next_cursor, str),
          f"{page}")
    rest = api("tasks", "list_tasks").sync(client=client, prefix=name, limit=10, cursor=page.next_cursor)
    check("list tasks: the next page", [t.name for t in page.tasks + rest.tasks]
          == sorted([name, name + "-b1", name + "-b2"]), f"{[t.name for t in page.tasks + rest.tasks]}")

    triggered = api("tasks", "trigger_task").sync(client=client, name=name)
    check("trigger: a run handle", triggered is not None and triggered.triggered, f"{triggered}")
    run_id = str(triggered.run_id)

    deadline = time.monotonic() + 60
    while True:
        run = api("runs", "get_run").sync(client=client, id=run_id, wait="30s")
        if run.state in (models.RunState.SUCCEEDED, models.RunState.FAILED, models.RunState.DEAD) \
                or time.monotonic() > deadline:
            break
    check("wait on the handle: succeeded, with the output",
          run.state == models.RunState.SUCCEEDED and "generated client" in (run.output or ""),
          f"{run.state} {run.output!r} {run.error_message!r}")

    runs = api("runs", "list_runs").sync(client=client, task=name, state=models.RunStateFilter.SUCCEEDED)
    check("list runs by task and state", [str(r.id) for r in runs.runs] == [run_id], f"{runs}")

    # A long run, cancelled while it runs; a second cancel is a typed 409.
    long_name = name + "-long"
    api("tasks", "create_tasks").sync(client=client, body=models.NewTask(
        name=long_name, executor="shell", queue=queue, schedule="manual",
        parameters=models.NewTaskParameters.from_dict({"argv": ["/bin/sleep", "60"]})))
    long_id = str(api("tasks", "trigger_task").sync(client=client, name=long_name).run_id)
    deadline = time.monotonic() + 60
    while True:
        long_run = api("runs", "get_run").sync(client=client, id=long_id, wait="1s")
        if long_run.state == models.RunState.RUNNING or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    check("the long run starts", long_run.state == models.RunState.RUNNING, f"{long_run.state}")
    cancelled = api("runs", "cancel_run").sync_detailed(client=client, id=long_id)
    check("cancel it", cancelled.status_code == 200 and cancelled.parsed.state == "cancelled",
          f"{cancelled.status_code} {cancelled.content[:300]!r}")
    twice = api("runs", "cancel_run").sync_detailed(client=client, id=long_id)
    check("cancel it again: 409, problem type conflict", twice.status_code == 409
          and twice.parsed.type_ == models.ProblemType.URNCONVEYORPROBLEMCONFLICT,
          f"{twice.status_code} {twice.content[:300]!r}")
    ended = api("runs", "get_run").sync(client=client, id=long_id, wait="30s")
    check("the run reads cancelled", ended.state == models.RunState.CANCELLED, f"{ended.state}")

    missing = api("tasks", "get_task").sync_detailed(client=client, name=name + "-nope")
    check("a task that does not exist: 404, problem type not-found", missing.status_code == 404
          and missing.parsed.type_ == models.ProblemType.URNCONVEYORPROBLEMNOT_FOUND,
          f"{missing.status_code} {missing.content[:300]!r}")
    bad = api("tasks", "update_task").sync_detailed(client=client, name=name, body=models.TaskPatch(timeout=-1))
    check("a bad value: 400 naming the field", bad.status_code == 400 and bad.parsed.field == "timeout"
          and bad.parsed.type_ == models.ProblemType.URNCONVEYORPROBLEMINVALID_REQUEST,
          f"{bad.status_code} {bad.content[:300]!r}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--spec", required=True)
    p.add_argument("--url", required=True)
    p.add_argument("--key-file", required=True)
    p.add_argument("--queue", required=True)
    p.add_argument("--workdir", required=True)
    a = p.parse_args()
    with open(a.key_file) as f:
        key = f.read().strip()
    pkg = generate(a.spec, a.workdir)
    session(pkg, a.url, key, a.queue, a.spec)
    print(json.dumps({"session": "complete"}))


if __name__ == "__main__":
    main()
