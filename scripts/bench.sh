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
if [ "${CONVEYOR_BENCH_CONFIG:-release}" = debug ]; then
  swift build >&2
  exec .build/debug/conveyor bench "$@"
fi
# The release build as scripts/build-release.sh makes it for the image, run.sh and the tests.
scripts/build-release.sh "$ROOT/.local/dist" >&2
exec .local/dist/conveyor bench "$@"
