#!/usr/bin/env bash
# Runs every test against real PostgreSQL 15 and RabbitMQ started by the project itself.
# This is README command 2; .ci/run calls exactly this.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# Preflight, in seconds: every program, library and Python module of scripts/requirements.tsv,
# installed when missing (root), or each missing one named with the command that installs it.
scripts/requirements.sh install
scripts/services.sh start
# shellcheck disable=SC1091
source .local/env
export CI="${CI:-false}"
# House style (.swift-format: 120 columns): the formatter finds nothing to change anywhere.
swift format lint --strict --recursive --parallel Sources Tests Examples Package.swift
# Warnings are errors in every target of the package (Package.swift), so this build has none.
swift build --build-tests
# Every suite but the fault suite, which needs servers of its own (it restarts and kills them).
swift test --skip-build --no-parallel --skip FaultSuite "$@"
if [ $# -eq 0 ]; then
  # A full run (no arguments, as CI runs it) proves the image's build steps: the Dockerfile runs
  # scripts/build-release.sh, and its binaries must start away from the build folder with their
  # resource bundles (the migrations here).
  scripts/build-release.sh "$ROOT/.local/dist"
  (cd / && "$ROOT/.local/dist/conveyor" migrate)
  # Each long-running process of that build answers /readyz and stops cleanly on SIGTERM.
  scripts/smoke_dist.sh "$ROOT/.local/dist"
  # Then the fault suite's fast profile (docs/reliability.md), against its own PostgreSQL and
  # RabbitMQ, runs those release binaries: the build users run. (Swift 6.3's -O once corrupted
  # worker results that debug builds never showed: docs/architecture.md.)
  CONVEYOR_TEST_BINARIES="$ROOT/.local/dist" scripts/faults.sh --no-build
fi
