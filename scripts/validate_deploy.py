#!/usr/bin/env python3
"""Validates the deployment files offline; part of the test command (DeployTests).

    python3 scripts/validate_deploy.py [ROOT]

- docker-compose.yml: `docker-compose config` (Debian's docker-compose) with placeholder secrets.
- deploy/overlays/*: rendered with `kubectl kustomize` (Debian's kubernetes-client), every object
  validated against the Kubernetes schemas by kubernetes-validate (PyPI), strictly; KEDA objects,
  whose CRD schema is not bundled, are checked field by field here.
- Against what the binaries read: probe paths and container ports match config/*.yaml, every
  CONVEYOR_* variable is one the code reads (a settings key or a literal), every OTEL_* is one
  docs/tracing.md lists, the worker's grace period covers its drain, the KEDA queue is the real
  queue name, deploy/base/config equals config/, and every container is non-root, read-only and
  drops all capabilities, with requests and limits.

Exits 1 with one line per problem.
"""
import itertools
import json
import os
import re
import subprocess
import sys

import yaml

ROOT = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), ".."))
K8S_VERSION = "1.30"
problems = []


def problem(where, what):
    problems.append(f"{where}: {what}")


def load(path):
    with open(os.path.join(ROOT, path)) as f:
        return yaml.safe_load(f)


config = {name: load(f"config/{name}.yaml") for name in ("dispatcher", "worker", "api")}
sources = ""
for d, _, files in os.walk(os.path.join(ROOT, "Sources")):
    for f in files:
        if f.endswith(".swift"):
            with open(os.path.join(d, f)) as fh:
                sources += fh.read()


def conveyor_variable_is_read(name):
    """CONVEYOR_API_TRACE_LINK_TEMPLATE is read if the code names it, or names a settings key that
    maps to it (api.trace_link_template: dots and underscores both become underscores)."""
    if f'"{name}"' in sources:
        return True
    parts = name[len("CONVEYOR_"):].lower().split("_")
    for dots in itertools.product([".", "_"], repeat=len(parts) - 1):
        key = parts[0] + "".join(sep + p for sep, p in zip(dots, parts[1:]))
        if "." in key and f'"{key}"' in sources:
            return True
    return False


with open(os.path.join(ROOT, "docs/tracing.md")) as f:
    documented_otel = set(re.findall(r"`(OTEL_[A-Z_]+)`", f.read()))


def check_env_names(where, names):
    for n in names:
        if n.startswith("CONVEYOR_") and not conveyor_variable_is_read(n):
            problem(where, f"{n} is not read by any Conveyor binary")
        elif n.startswith("OTEL_") and n not in documented_otel:
            problem(where, f"{n} is not an OTEL_* variable docs/tracing.md lists")


# docker-compose.yml
env = dict(os.environ, POSTGRES_PASSWORD="placeholder", RABBITMQ_PASSWORD="placeholder", RABBITMQ_DISPATCHER_PASSWORD="placeholder",
           RABBITMQ_WORKER_PASSWORD="placeholder", RABBITMQ_API_PASSWORD="placeholder")
r = subprocess.run(["docker-compose", "-f", os.path.join(ROOT, "docker-compose.yml"), "config"],
                   capture_output=True, text=True, env=env, cwd=ROOT)
if r.returncode != 0:
    problem("docker-compose.yml", r.stderr.strip() or r.stdout.strip())
else:
    compose = yaml.safe_load(r.stdout)
    for name, svc in compose.get("services", {}).items():
        check_env_names(f"docker-compose.yml {name}", (svc.get("environment") or {}).keys())
    if compose["services"].get("api", {}).get("ports", [{}])[0].get("target") not in (config["api"]["api"]["port"], None):
        problem("docker-compose.yml api", "the published port is not api.port")

# Kubernetes overlays
try:
    import kubernetes_validate
except ImportError:
    kubernetes_validate = None
    problem("kubernetes-validate", "not installed (pip install kubernetes-validate)")

ports = {"dispatcher": config["dispatcher"]["dispatcher"]["http_port"], "worker": config["worker"]["worker"]["http_port"],
         "api": config["api"]["api"]["port"]}
prefix, first_queue = config["worker"]["amqp"]["prefix"], config["worker"]["worker"]["queues"][0]
# The work queue and its isolation lane (docs/workers.md): both must scale the workers.
scaled_queues = {f"{prefix}.q.{first_queue}", f"{prefix}.isolated.{first_queue}"}
drain = config["worker"]["worker"]["shutdown_grace_ms"] / 1000
# The version the binaries report (Sources/ConveyorCore/Version.swift): the migrate Job is named by it.
version = re.search(r'current = "([0-9.]+)"', sources).group(1)
migrate_job = "conveyor-migrate-" + version.replace(".", "-")

with open(os.path.join(ROOT, "docs/operations.md")) as f:
    operations = f.read()
with open(os.path.join(ROOT, "docs/observability.md")) as f:
    observability = f.read()
anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
           for h in re.findall(r"^#+ (.*)$", operations, flags=re.M)}
# The metric families docs/observability.md lists (its table), for the dashboard's queries.
documented = set(re.findall(r"`(conveyor_[a-z_]+)`", observability))


def family(name):
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in documented:
            return name[: -len(suffix)]
    return name


def check_components(where, docs, kinds):
    """The Prometheus Operator's objects, when the overlay has them: PodMonitors select a
    Deployment's pods and name a port it declares; the PrometheusRule passes `promtool check
    rules` and every alert's runbook is a section of docs/operations.md; the Grafana dashboard
    is a dashboard whose queries name documented metrics."""
    deployments = {d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/name"): d
                   for d in docs if d["kind"] == "Deployment"}
    for d in docs:
        name = f'{where} {d["kind"]}/{d["metadata"]["name"]}'
        if d["kind"] == "PodMonitor":
            app = d["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/name")
            dep = deployments.get(app)
            if not dep:
                problem(name, f"selects no Deployment's pods ({app})")
                continue
            declared = {p["name"] for c in dep["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
            for e in d["spec"]["podMetricsEndpoints"]:
                if e.get("port") not in declared:
                    problem(name, f"port {e.get('port')} is not one {app} declares ({sorted(declared)})")
                if e.get("path") != "/metrics":
                    problem(name, "path must be /metrics")
        elif d["kind"] == "PrometheusRule":
            rules = [r for g in d["spec"]["groups"] for r in g["rules"]]
            for r in rules:
                url = r.get("annotations", {}).get("runbook_url", "")
                if not url.startswith("docs/operations.md#") or url.split("#", 1)[1] not in anchors:
                    problem(name, f"alert {r.get('alert')}: runbook_url {url!r} is not a section of docs/operations.md")
            path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"conveyor-rules-{os.getpid()}.yaml")
            with open(path, "w") as f:
                yaml.safe_dump({"groups": d["spec"]["groups"]}, f)
            try:
                c = subprocess.run(["promtool", "check", "rules", path], capture_output=True, text=True)
            except FileNotFoundError:
                problem(name, "promtool is not installed (scripts/requirements.sh install)")
            else:
                if c.returncode != 0:
                    problem(name, "promtool check rules: " + (c.stdout + c.stderr).strip())
            finally:
                os.remove(path)
        elif d["kind"] == "ConfigMap" and d["metadata"].get("labels", {}).get("grafana_dashboard") == "1":
            for file, text in d.get("data", {}).items():
                try:
                    dash = json.loads(text)
                except ValueError as e:
                    problem(name, f"{file}: not JSON: {e}")
                    continue
                panels = dash.get("panels") or []
                if not dash.get("title") or not panels:
                    problem(name, f"{file}: a dashboard needs a title and panels")
                for p in panels:
                    if not p.get("targets") or not all(t.get("expr") for t in p["targets"]):
                        problem(name, f"{file}: panel {p.get('title')!r} has no query")
                    for t in p.get("targets", []):
                        for m in re.findall(r"\b(conveyor_[a-z_]+)", t.get("expr", "")):
                            if family(m) not in documented:
                                problem(name, f"{file}: panel {p.get('title')!r} queries {m}, which docs/observability.md does not list")


for overlay in sorted(os.listdir(os.path.join(ROOT, "deploy/overlays"))):
    where = f"deploy/overlays/{overlay}"
    r = subprocess.run(["kubectl", "kustomize", os.path.join(ROOT, where)], capture_output=True, text=True)
    if r.returncode != 0:
        problem(where, "kustomize: " + r.stderr.strip())
        continue
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    check_components(where, docs, kinds)
    if ("Job", migrate_job) not in kinds:
        problem(where, f"no Job {migrate_job}: the migrate Job is named by the version ({version}), so an upgrade applies")
    for dep in ("conveyor-dispatcher", "conveyor-worker", "conveyor-api"):
        if ("PodDisruptionBudget", dep) not in kinds:
            problem(where, f"no PodDisruptionBudget for {dep}")
    if ("ServiceAccount", "conveyor") not in kinds:
        problem(where, "no ServiceAccount conveyor")
    for d in docs:
        name = f'{where} {d["kind"]}/{d["metadata"]["name"]}'
        if d["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # no bundled schema: checked field by field in check_components
        if d["apiVersion"].startswith("keda.sh/"):
            if d["kind"] == "ScaledObject":
                target = d["spec"]["scaleTargetRef"]["name"]
                if ("Deployment", target) not in kinds:
                    problem(name, f"scaleTargetRef {target} is not a Deployment here")
                triggered = {t["metadata"].get("queueName") for t in d["spec"]["triggers"] if t["type"] == "rabbitmq"}
                if triggered != scaled_queues:
                    problem(name, f"rabbitmq triggers watch {sorted(triggered)}, not the work queue and its isolation lane {sorted(scaled_queues)}")
                for t in d["spec"]["triggers"]:
                    if t["type"] == "rabbitmq":
                        if t["metadata"].get("protocol") != "http":
                            problem(name, "protocol must be http: over AMQP KEDA counts ready messages only, not the unacknowledged ones being run")
                        if t["metadata"].get("mode") != "QueueLength":
                            problem(name, "mode must be QueueLength (ready and unacknowledged messages)")
                        ref = t.get("authenticationRef", {}).get("name")
                        if ref and ("TriggerAuthentication", ref) not in kinds:
                            problem(name, f"authenticationRef {ref} is missing")
            continue
        if kubernetes_validate:
            try:
                kubernetes_validate.validate(d, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                problem(name, f"{'.'.join(str(p) for p in e.path)}: {e.message}")
            except Exception as e:  # a kind the bundled schemas lack
                problem(name, f"not validated: {e}")
        if d["kind"] not in ("Deployment", "Job"):
            continue
        spec = d["spec"]["template"]["spec"]
        if spec.get("serviceAccountName") != "conveyor" or spec.get("automountServiceAccountToken") is not False:
            problem(name, "runs as ServiceAccount conveyor with automountServiceAccountToken: false (no Kubernetes API token)")
        pod_sc = spec.get("securityContext", {})
        if not pod_sc.get("runAsNonRoot"):
            problem(name, "pod securityContext.runAsNonRoot is not true")
        for c in spec["containers"]:
            sc = c.get("securityContext", {})
            if not sc.get("readOnlyRootFilesystem") or sc.get("allowPrivilegeEscalation") is not False \
                    or "ALL" not in sc.get("capabilities", {}).get("drop", []):
                problem(name, f"container {c['name']}: needs readOnlyRootFilesystem, no privilege escalation, capabilities drop ALL")
            res = c.get("resources", {})
            if "requests" not in res or "memory" not in res.get("limits", {}):
                problem(name, f"container {c['name']}: needs resource requests and a memory limit")
            check_env_names(name, [e["name"] for e in c.get("env", [])])
            role = c["args"][0] if c.get("args") else ""
            if role in ports:
                declared = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
                if ports[role] not in declared.values():
                    problem(name, f"container port is not {role}'s configured port {ports[role]}")
                for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                    probe = c.get(kind, {}).get("httpGet")
                    if not probe:
                        problem(name, f"{kind} is missing")
                        continue
                    if probe["path"] not in ("/healthz", "/readyz"):
                        problem(name, f"{kind} path {probe['path']} is not served (/healthz, /readyz)")
                    if kind == "startupProbe" and probe["path"] != "/readyz":
                        problem(name, "startupProbe must wait for /readyz (connected, and the schema migrated), not /healthz")
                    port = declared.get(probe["port"], probe["port"])
                    if port != ports[role]:
                        problem(name, f"{kind} port {probe['port']} is not {role}'s port {ports[role]}")
                if role == "worker" and spec.get("terminationGracePeriodSeconds", 30) <= drain:
                    problem(name, f"terminationGracePeriodSeconds must exceed worker.shutdown_grace_ms ({drain:g} s)")

# The ConfigMap's files are config/'s.
for f in ("dispatcher.yaml", "worker.yaml", "api.yaml"):
    with open(os.path.join(ROOT, "config", f)) as a, open(os.path.join(ROOT, "deploy/base/config", f)) as b:
        if a.read() != b.read():
            problem(f"deploy/base/config/{f}", f"differs from config/{f}: copy it (cp config/*.yaml deploy/base/config/)")

for p in problems:
    print(p)
print(f"deploy validation: {len(problems)} problem(s)", file=sys.stderr)
sys.exit(1 if problems else 0)
