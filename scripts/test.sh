#!/usr/bin/env bash
# Runs every test against real PostgreSQL 15 and RabbitMQ started by the project itself.
# This is README command 2; .ci/run calls exactly this.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/services.sh start
# shellcheck disable=SC1091
source .local/env
export CI="${CI:-false}"
swift build --build-tests
# Swift Testing suites run in parallel; suites that disturb the broker are .serialized inside.
swift test --skip-build --no-parallel "$@"
# A full run (no arguments, as CI runs it) also proves the image's build steps: the Dockerfile
# runs scripts/build-release.sh, and its binaries must start away from the build folder with
# their resource bundles (the migrations here).
if [ $# -eq 0 ]; then
  scripts/build-release.sh "$ROOT/.local/dist"
  (cd / && "$ROOT/.local/dist/conveyor" migrate)
fi
