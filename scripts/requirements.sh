#!/usr/bin/env bash
# What the machine must have, from the one table scripts/requirements.tsv.
#
#   scripts/requirements.sh check     every row present, or exit 1 naming each missing one, its
#                                     package and the command that installs it (test.sh's preflight)
#   scripts/requirements.sh install   apt-get update and install the missing apt rows, then pip the
#                                     missing pip rows (root), then check (services.sh start runs it)
#
# CONVEYOR_REQUIREMENTS names another table (SetupTests uses it to see a missing row reported).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TABLE="${CONVEYOR_REQUIREMENTS:-$ROOT/scripts/requirements.tsv}"

log() { printf '[requirements] %s\n' "$*" >&2; }

# present CHECK NAME: is this row satisfied?
present() {
  case "$1" in
    PATH) command -v "$2" >/dev/null 2>&1 ;;
    pkg-config) command -v pkg-config >/dev/null 2>&1 && pkg-config --exists "$2" 2>/dev/null ;;
    python) command -v python3 >/dev/null 2>&1 && python3 -c "import $2" >/dev/null 2>&1 ;;
    /*) [ -x "$1" ] ;;
    *) log "$TABLE: row '$2' has an unknown check '$1' (an absolute path, PATH, pkg-config or python)"; return 2 ;;
  esac
}

# rows: the table without comments and blank lines, as "name check package used-by…"
rows() { grep -Ev '^[[:space:]]*(#|$)' "$TABLE"; }

# missing: one line "name<TAB>check<TAB>package<TAB>used-by" per absent row.
missing() {
  local name check package used
  while read -r name check package used; do
    if ! present "$check" "$name"; then printf '%s\t%s\t%s\t%s\n' "$name" "$check" "$package" "$used"; fi
  done < <(rows)
}

install_command() {
  case "$1" in
    apt:*) echo "apt-get install -y ${1#apt:}" ;;
    pip:*) echo "python3 -m pip install '${1#pip:}'" ;;
    *) echo "(unknown package kind '$1' in $TABLE)" ;;
  esac
}

check() {
  local lines
  lines="$(missing)"
  if [ -z "$lines" ]; then log "all $(rows | wc -l) rows of $(basename "$TABLE") present"; return 0; fi
  local name check package used
  while IFS=$'\t' read -r name check package used; do
    printf '[requirements] missing: %s (%s), needed by %s; install it with: %s\n' \
      "$name" "$check" "$used" "$(install_command "$package")" >&2
  done <<< "$lines"
  log "as root, scripts/services.sh start installs every row of $TABLE"
  return 1
}

pip_install() {
  # Debian's own python3 is "externally managed" (PEP 668); a pyenv or venv python is not.
  python3 -m pip install -q --disable-pip-version-check "$@" >/dev/null 2>&1 \
    || python3 -m pip install -q --disable-pip-version-check --break-system-packages "$@" >/dev/null
}

install() {
  local apt=() pip=() name check package used
  while IFS=$'\t' read -r name check package used; do
    case "$package" in
      apt:*) [[ " ${apt[*]} " == *" ${package#apt:} "* ]] || apt+=("${package#apt:}") ;;
    esac
  done < <(missing)
  if [ ${#apt[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || { check; log "not root: cannot apt-get install ${apt[*]}"; return 1; }
    log "installing (apt): ${apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # No package starts a daemon of its own (a policy-rc.d that denies every start, as container
    # images have): scripts/services.sh runs PostgreSQL and RabbitMQ as plain processes on their
    # own ports, and Debian's prometheus (for promtool) would otherwise take the dispatcher's 9090.
    # (a file invoke-rc.d reads, not a program this project runs: no row in requirements.tsv)
    local sbin=/usr/sbin made=0
    local policy="$sbin/policy-rc.d"
    if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && made=1; fi
    local rc=0
    apt-get install -y -qq "${apt[@]}" >/dev/null || rc=$?
    if [ "$made" = 1 ]; then rm -f "$policy"; fi
    [ "$rc" = 0 ] || return "$rc"
  fi
  # pip rows after apt: python3 and pip themselves are apt rows. Asked again, since a Python
  # module may have come with an apt package.
  while IFS=$'\t' read -r name check package used; do
    case "$package" in pip:*) pip+=("${package#pip:}") ;; esac
  done < <(missing)
  if [ ${#pip[@]} -gt 0 ]; then
    log "installing (pip): ${pip[*]}"
    pip_install "${pip[@]}"
  fi
  check
}

case "${1:-}" in
  check) check ;;
  install) install ;;
  *) echo "usage: $0 check|install" >&2; exit 2 ;;
esac
