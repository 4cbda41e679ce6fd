#!/usr/bin/env bash
# The release build, as the container image makes it (Dockerfile) and as CI checks it.
#
#   scripts/build-release.sh [OUT]     build conveyor and conveyorctl into OUT (default dist/)
#
# The Swift standard library and Foundation are linked statically, so the runtime needs only
# libpq5 and librabbitmq4 (and glibc). The resource bundles SwiftPM makes (migrations, the
# OpenAPI document, the dashboard) sit next to the binaries, where Bundle.module looks.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/dist}"
cd "$ROOT"
SCRATCH="${CONVEYOR_RELEASE_SCRATCH:-$ROOT/.build-release}"
swift build -c release --static-swift-stdlib --scratch-path "$SCRATCH" --product conveyor
swift build -c release --static-swift-stdlib --scratch-path "$SCRATCH" --product conveyorctl
BIN="$(swift build -c release --static-swift-stdlib --scratch-path "$SCRATCH" --show-bin-path)"
mkdir -p "$OUT"
cp "$BIN/conveyor" "$BIN/conveyorctl" "$OUT/"
# DWARF debug info is dropped (205 + 136 MB → 126 + 96 MB, measured); the symbol table stays,
# so a crash backtrace still names its functions. CONVEYOR_KEEP_DEBUG=1 keeps everything.
if [ "${CONVEYOR_KEEP_DEBUG:-0}" != 1 ]; then
  # binutils' strip (scripts/requirements.tsv; the Swift image has it too).
  strip --strip-debug "$OUT/conveyor" "$OUT/conveyorctl"
fi
for bundle in "$BIN"/*.resources; do
  rm -rf "$OUT/$(basename "$bundle")"
  cp -R "$bundle" "$OUT/"
done
# What the image runs must start: every subcommand's help, and the bundles found from elsewhere.
(cd / && "$OUT/conveyor" --help >/dev/null && "$OUT/conveyorctl" --help >/dev/null)
echo "built into $OUT:"; ls -1 "$OUT"
