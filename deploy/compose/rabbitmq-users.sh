#!/usr/bin/env bash
# Compose's one-shot `rabbitmq-users`: the broker users conveyor-dispatcher, conveyor-worker and
# conveyor-api, each with its password from RABBITMQ_<ROLE>_PASSWORD and the permissions of
# deploy/broker-permissions.tsv on vhost `/` ({p} is `conveyor`, amqp.prefix). Idempotent: an
# existing user gets its password and permissions set again, and no tags.
#
# rabbitmqctl talks to the broker's Erlang node (rabbit@rabbitmq: the rabbitmq service has
# `hostname: rabbitmq`) with the cookie in the shared rabbitmq-data volume ($HOME in the image).
# Passwords reach rabbitmqctl on stdin, never its command line, and are never printed.
set -euo pipefail

node="${CONVEYOR_RABBITMQ_NODE:-rabbit@rabbitmq}"
table="${CONVEYOR_BROKER_PERMISSIONS:-$(dirname "$0")/../broker-permissions.tsv}"
prefix=conveyor   # {p}: a regular expression, the amqp.prefix of config/*.yaml

die() { echo "rabbitmq-users: $*" >&2; exit 1; }
ctl() { rabbitmqctl -n "$node" -q "$@"; }

[ -r "$table" ] || die "cannot read the permission table $table"

# Read the whole table and check every password before changing anything.
roles=() confs=() writes=() reads=()
while IFS=$'\t' read -r role conf write rd extra || [ -n "$role" ]; do
  rd="${rd%$'\r'}"
  case "$role" in ''|'#'*|role) continue;; esac
  [[ "$role" =~ ^[a-z]+$ ]] || die "$table: bad role name '$role'"
  [ -n "$rd" ] && [ -z "$extra" ] || die "$table: role $role: want 4 tab-separated columns (role, configure, write, read)"
  var="RABBITMQ_${role^^}_PASSWORD"
  [ -n "${!var:-}" ] || die "$var is not set: the password of broker user conveyor-$role (set it in .env)"
  case "${!var}" in
    *[[:space:]]*) die "$var contains white space: use letters and digits (it goes into CONVEYOR_AMQP_URL as it is)";;
  esac
  roles+=("$role") confs+=("$conf") writes+=("$write") reads+=("$rd")
done < "$table"
[ "${#roles[@]}" -gt 0 ] || die "$table lists no roles"

ctl await_startup
users="$(rabbitmqctl -n "$node" -s list_users | cut -f1)"

for i in "${!roles[@]}"; do
  role="${roles[$i]}" user="conveyor-${roles[$i]}" var="RABBITMQ_${roles[$i]^^}_PASSWORD"
  if grep -Fxq -- "$user" <<<"$users"; then
    printf '%s\n' "${!var}" | ctl change_password "$user"
    action=updated
  else
    printf '%s\n' "${!var}" | ctl add_user "$user"
    action=created
  fi
  ctl set_user_tags "$user"   # no tags: no management UI or HTTP API
  ctl set_permissions -p / "$user" \
    "${confs[$i]//\{p\}/$prefix}" "${writes[$i]//\{p\}/$prefix}" "${reads[$i]//\{p\}/$prefix}"
  echo "rabbitmq-users: $user $action, permissions on / set for role $role"
done
