#!/usr/bin/env bash
# The project's bench command: starts the local servers and runs `conveyor bench` on a build.
#   scripts/bench.sh [--tasks N] [--workers W] [--json]
# The release build, as users run it (CONVEYOR_BENCH_CONFIG=debug for the debug build).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/services.sh start >/dev/null
# shellcheck disable=SC1091
source .local/env
CONFIG="${CONVEYOR_BENCH_CONFIG:-release}"
swift build -c "$CONFIG" >&2
exec ".build/$CONFIG/conveyor" bench "$@"
