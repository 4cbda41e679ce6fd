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
# The release build, made as the image and scripts/test.sh make it (one build tree for all three).
scripts/build-release.sh "$ROOT/.local/dist" >&2
.local/dist/conveyor migrate
echo "[run] conveyor dev --demo: in another shell, from this folder, watch with '.local/dist/conveyorctl task list' and 'conveyorctl task get demo-shell' (conveyor dev leaves conveyorctl configured in .local/)" >&2
exec .local/dist/conveyor dev --demo --workers 2 "$@"
