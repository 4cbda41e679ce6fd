# Broker users, one per role, with the permissions of deploy/broker-permissions.tsv ({p} is any
# one-word prefix here, so the test suites' per-test prefixes work). `conveyor-admin` holds every
# permission and is for the test suites and people, never for a component. `guest` is deleted.
# Sourced by scripts/services.sh (one node) and scripts/cluster.sh (once per cluster: users
# replicate); not run on its own. Each caller defines `log`.

# broker_password DIR ROLE: the role's password, made once under DIR (mode 600).
broker_password() {
  local f="$1/$2.password"
  if [ ! -s "$f" ]; then
    mkdir -p "$1"
    (umask 077; head -c 24 /dev/urandom | base64 | tr -d '=+/\n' > "$f")
  fi
  cat "$f"
}

# broker_users CTL DIR MARKER: creates (or re-passwords) the users and sets their permissions,
# through CTL (a command that runs rabbitmqctl against the node, given its arguments), with the
# passwords under DIR. Skipped when MARKER holds the table's checksum (a fresh node has no
# marker, so it gets the users again).
broker_users() {
  local ctl="$1" dir="$2" marker="$3"
  local table="$ROOT/deploy/broker-permissions.tsv"
  local sum; sum="$(sha256sum "$table" | cut -d' ' -f1)"
  if [ -f "$marker" ] && [ "$(cat "$marker")" = "$sum" ] && [ -s "$dir/api.password" ]; then return; fi
  log "creating broker users conveyor-admin, conveyor-dispatcher, conveyor-worker, conveyor-api"
  local users role user conf write read
  users="$("$ctl" -q list_users </dev/null | awk '{print $1}')"
  for role in admin dispatcher worker api; do
    user="conveyor-$role"
    if grep -qx "$user" <<<"$users"; then "$ctl" -q change_password "$user" "$(broker_password "$dir" "$role")" >/dev/null </dev/null
    else "$ctl" -q add_user "$user" "$(broker_password "$dir" "$role")" >/dev/null </dev/null; fi
  done
  "$ctl" -q set_permissions -p / conveyor-admin '.*' '.*' '.*' >/dev/null </dev/null
  "$ctl" -q set_user_tags conveyor-admin administrator >/dev/null </dev/null
  while IFS=$'\t' read -r role conf write read; do
    case "$role" in ''|'#'*|role) continue;; esac
    # </dev/null: rabbitmqctl reads stdin, which would swallow the rest of the table.
    "$ctl" -q set_permissions -p / "conveyor-$role" "${conf//\{p\}/[^.]+}" "${write//\{p\}/[^.]+}" \
      "${read//\{p\}/[^.]+}" >/dev/null </dev/null
  done < "$table"
  if grep -qx guest <<<"$users"; then "$ctl" -q delete_user guest >/dev/null </dev/null; fi
  echo "$sum" > "$marker"
}
