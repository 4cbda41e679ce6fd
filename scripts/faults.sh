#!/usr/bin/env bash
# The fault suite (docs/reliability.md): every scenario against real servers of its own, with
# separate dispatcher and worker processes, one summary line per scenario.
#
#   scripts/faults.sh              the fast profile (what CI runs, part of scripts/test.sh)
#   scripts/faults.sh --full       the full profile (N = 10,000 where it applies)
#   scripts/faults.sh --filter X   only the scenarios whose test name contains X
#   scripts/faults.sh --no-build   use the test build already made (scripts/test.sh does)
#   scripts/faults.sh --no-cluster skip the cluster pass
#
# Then a second pass, the cluster scenarios (ClusterFaultSuite, issue 25), against the cluster bed
# of scripts/cluster.sh: three RabbitMQ nodes and a PostgreSQL primary with a synchronous standby.
# The standard variables (CONVEYOR_AMQP_URL, CONVEYOR_TEST_PG_ADMIN_URL, …) point at the cluster
# for that pass: every process gets all three brokers and the multi-host database URL. The fast
# profile runs one cluster scenario, the full one all of them. The cluster is stopped afterwards.
#
# It starts its own PostgreSQL and RabbitMQ under .local/faults, because it restarts, kills and
# starves them. Their ports, 26432 and 26672 (CONVEYOR_FAULT_PG_PORT, CONVEYOR_FAULT_AMQP_PORT),
# sit below Linux's ephemeral range: a client reconnecting while a server is down can otherwise be
# given the server's port, connect to itself, and keep the server from starting again. The broker
# listens on every address (one scenario runs a worker in its own network namespace), with a
# short consumer_timeout. Exit status: non-zero when any scenario fails.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PROFILE=fast
FILTER=FaultSuite
BUILD=1
CLUSTER=1
while [ $# -gt 0 ]; do
  case "$1" in
    --full) PROFILE=full;;
    --filter) FILTER="FaultSuite.*$2"; shift;;
    --no-build) BUILD=0;;
    --no-cluster) CLUSTER=0;;
    *) echo "usage: $0 [--full] [--filter NAME] [--no-build] [--no-cluster]" >&2; exit 2;;
  esac
  shift
done
export CONVEYOR_LOCAL_DIR="$ROOT/.local/faults"
export CONVEYOR_PG_PORT="${CONVEYOR_FAULT_PG_PORT:-26432}"
export CONVEYOR_AMQP_PORT="${CONVEYOR_FAULT_AMQP_PORT:-26672}"
unset CONVEYOR_AMQP_DIST_PORT CONVEYOR_AMQP_EPMD_PORT CONVEYOR_AMQP_NODE
export CONVEYOR_AMQP_BIND=0.0.0.0
export CONVEYOR_AMQP_CONSUMER_TIMEOUT_MS=20000
mkdir -p "$CONVEYOR_LOCAL_DIR/logs"
scripts/services.sh start
# shellcheck disable=SC1091
source "$CONVEYOR_LOCAL_DIR/env"
export CI="${CI:-false}"
export CONVEYOR_FAULT_PROFILE="$PROFILE"
export CONVEYOR_FAULT_LOGS="$CONVEYOR_LOCAL_DIR/logs"
export CONVEYOR_FAULT_RESULTS="$CONVEYOR_LOCAL_DIR/results-$PROFILE.txt"
# Scenario 12 preloads this in front of libfaketime (see the file for why).
export CONVEYOR_FAULT_FAKETIME_SHIM="$CONVEYOR_LOCAL_DIR/faketime_timerfd.so"
cc -shared -fPIC -O2 -o "$CONVEYOR_FAULT_FAKETIME_SHIM" scripts/faketime_timerfd.c
: > "$CONVEYOR_FAULT_RESULTS"
if [ "$BUILD" = 1 ]; then swift build --build-tests; fi
status=0
swift test --skip-build --no-parallel --skip ClusterFaultSuite --filter "$FILTER" || status=$?
if [ "$CLUSTER" = 1 ]; then
  scripts/cluster.sh start
  (
    # shellcheck disable=SC1091
    source "$ROOT/.local/cluster/env"
    export CONVEYOR_FAULT_CLUSTER=1
    export CONVEYOR_DATABASE_URL="$CONVEYOR_CLUSTER_DATABASE_URL"
    export CONVEYOR_TEST_PG_ADMIN_URL="$CONVEYOR_CLUSTER_PG_ADMIN_URL"
    export CONVEYOR_AMQP_URL="$CONVEYOR_CLUSTER_AMQP_URLS_DISPATCHER"
    export CONVEYOR_WORKER_AMQP_URL="$CONVEYOR_CLUSTER_AMQP_URLS_WORKER"
    export CONVEYOR_API_AMQP_URL="$CONVEYOR_CLUSTER_AMQP_URLS_API"
    export CONVEYOR_TEST_AMQP_ADMIN_URL="$CONVEYOR_CLUSTER_AMQP_URLS_ADMIN"
    export CONVEYOR_RABBITMQCTL="$ROOT/scripts/cluster.sh ctl 1"
    swift test --skip-build --no-parallel --filter "ClusterFaultSuite${FILTER#FaultSuite}"
  ) || status=$?
  scripts/cluster.sh stop || true
fi
echo
echo "fault suite, $PROFILE profile ($(date -u +%FT%TZ), $(nproc) cores):"
cat "$CONVEYOR_FAULT_RESULTS"
if grep -q ' FAIL' "$CONVEYOR_FAULT_RESULTS"; then status=1; fi
if [ ! -s "$CONVEYOR_FAULT_RESULTS" ]; then echo "no scenario ran"; status=1; fi
exit $status
