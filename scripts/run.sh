#!/usr/bin/env bash
# README command 1: install what is missing, start PostgreSQL and RabbitMQ under .local/,
# build, migrate, create the demo tasks and run `conveyor dev` (dispatcher + 2 workers + the API on
# 127.0.0.1:8080; the first run prints an admin API key once).
# Ctrl-C stops Conveyor gracefully; `scripts/services.sh stop` stops the servers.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/services.sh start
# shellcheck disable=SC1091
source .local/env
# The release build: what the image ships and the fault suite runs.
swift build -c release
.build/release/conveyor migrate
echo "[run] conveyor dev --demo: in another shell, from this folder, watch with '.build/release/conveyorctl task list' and 'conveyorctl task get demo-shell' (conveyor dev leaves conveyorctl configured in .local/)" >&2
exec .build/release/conveyor dev --demo --workers 2 "$@"
