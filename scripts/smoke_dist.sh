#!/usr/bin/env bash
# Starts each long-running process of a release build (scripts/build-release.sh) from /, away
# from the build folder, and waits for its /readyz to answer 200; then stops it with SIGTERM and
# expects exit status 0. Needs CONVEYOR_DATABASE_URL and CONVEYOR_AMQP_URL (source .local/env).
#
#   scripts/smoke_dist.sh DIST_DIR
set -euo pipefail
DIST="$(cd "${1:?usage: $0 DIST_DIR}" && pwd)"
: "${CONVEYOR_DATABASE_URL:?source .local/env first}" "${CONVEYOR_AMQP_URL:?source .local/env first}"
export CONVEYOR_AMQP_PREFIX="smoke$$"
# As in the image (Dockerfile): the configuration is a folder of its own, /etc/conveyor there.
export CONVEYOR_CONFIG_DIR="${CONVEYOR_CONFIG_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/config}"

smoke() {  # name port env...
  local name="$1" port="$2"; shift 2
  local log; log="$(mktemp)"
  (cd / && exec env "$@" "$DIST/conveyor" "$name") >"$log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 150); do
    if curl -fsS -o /dev/null "http://127.0.0.1:$port/readyz" 2>/dev/null; then
      kill -TERM "$pid"
      local status=0; wait "$pid" || status=$?
      if [ "$status" -ne 0 ]; then echo "smoke: $name exited $status after SIGTERM"; cat "$log"; exit 1; fi
      echo "smoke: $name ready on :$port from / and stopped cleanly"
      rm -f "$log"; return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then echo "smoke: $name exited before it was ready"; cat "$log"; exit 1; fi
    sleep 0.2
  done
  kill -9 "$pid" 2>/dev/null || true
  echo "smoke: $name never answered 200 on /readyz:$port"; cat "$log"; exit 1
}

smoke dispatcher 19190 CONVEYOR_DISPATCHER_HTTP_PORT=19190 CONVEYOR_DISPATCHER_HTTP_HOST=127.0.0.1
# Each under its own broker login (scripts/services.sh): the dispatcher declares what the worker
# and the API only look up, so it goes first.
smoke worker 19191 CONVEYOR_AMQP_URL="${CONVEYOR_WORKER_AMQP_URL:?source .local/env first}" CONVEYOR_WORKER_HTTP_PORT=19191 CONVEYOR_WORKER_HTTP_HOST=127.0.0.1 CONVEYOR_WORKER_ID="smoke-$$"
smoke api 19180 CONVEYOR_AMQP_URL="${CONVEYOR_API_AMQP_URL:?source .local/env first}" CONVEYOR_API_PORT=19180 CONVEYOR_API_HOST=127.0.0.1
