#!/usr/bin/env bash
# Local PostgreSQL 15 and RabbitMQ for development and tests, as plain background processes
# under .local/ (git-ignored). No Docker, no systemd.
#
#   scripts/services.sh start    install what is missing, start both, wait until they accept connections
#   scripts/services.sh stop     stop both
#   scripts/services.sh status   say what runs
#   scripts/services.sh env      print the export lines for CONVEYOR_DATABASE_URL / CONVEYOR_AMQP_URL
#   scripts/services.sh pg-crash  `pg_ctl restart -m immediate` (the fault suite's database crash)
#   scripts/services.sh mq-kill   kill -9 the broker's Erlang VM (`start` brings it back)
#   scripts/services.sh mq-pid    the broker VM's process id
#
# A second pair (the fault suite's) runs beside the first with its own CONVEYOR_LOCAL_DIR and ports.
# CONVEYOR_AMQP_BIND (127.0.0.1) is the broker's listen address; CONVEYOR_AMQP_CONSUMER_TIMEOUT_MS
# (one hour) its consumer_timeout.
#
# Ports (override with the variables): CONVEYOR_PG_PORT=55432, CONVEYOR_AMQP_PORT=55672, the
# broker's distribution port CONVEYOR_AMQP_DIST_PORT (AMQP + 1) and its own epmd,
# CONVEYOR_AMQP_EPMD_PORT (AMQP + 2). None is a port a standard PostgreSQL or RabbitMQ holds
# (5432, 5672, 15672, 25672, epmd's 4369), so both run beside this pair; each port is checked
# before a server starts, and a taken one stops the script naming the port, its holder and the
# variable that moves it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCAL="${CONVEYOR_LOCAL_DIR:-$ROOT/.local}"
PG_PORT="${CONVEYOR_PG_PORT:-55432}"
AMQP_PORT="${CONVEYOR_AMQP_PORT:-55672}"
DIST_PORT="${CONVEYOR_AMQP_DIST_PORT:-$((AMQP_PORT + 1))}"
EPMD_PORT="${CONVEYOR_AMQP_EPMD_PORT:-$((AMQP_PORT + 2))}"
NODE="${CONVEYOR_AMQP_NODE:-conveyor-$AMQP_PORT@localhost}"
PG_DIR="$LOCAL/pg"
MQ_DIR="$LOCAL/rabbitmq"
PG_USER=postgres

log() { printf '[services] %s\n' "$*" >&2; }

install_packages() {
  # One table of what the scripts, tests and benches need: scripts/requirements.tsv.
  "$ROOT/scripts/requirements.sh" install
}

# A port this script is about to listen on must be free, or the server would fail later with a
# message about something else. Names the port, who holds it (ss -ltnp) and the variable that
# moves it. A process named in ALLOW (epmd, which any node may share) is no conflict.
require_free_port() {
  local port="$1" variable="$2" what="$3" allow="${4:-}" held
  held="$(ss -Hltnp "sport = :$port" 2>/dev/null || true)"
  [ -n "$held" ] || return 0
  if [ -n "$allow" ] && grep -q "\"$allow\"" <<< "$held"; then return 0; fi
  local who
  who="$(grep -o 'users:(([^)]*))' <<< "$held" | head -1)"
  log "cannot start $what: port $port is already in use by ${who:-another process (run as root to see which)}"
  log "  $(head -1 <<< "$held" | tr -s ' ')"
  log "  choose another port: $variable=<free port> $0 start  (and the same variable for scripts/test.sh)"
  exit 1
}

# Every port of a server that is not running yet, before either starts: a clash stops the
# script with nothing started.
require_free_ports() {
  pg_running || require_free_port "$PG_PORT" CONVEYOR_PG_PORT postgres
  if ! mq_running; then
    require_free_port "$AMQP_PORT" CONVEYOR_AMQP_PORT "rabbitmq (AMQP)"
    require_free_port "$DIST_PORT" CONVEYOR_AMQP_DIST_PORT "rabbitmq (distribution)"
    require_free_port "$EPMD_PORT" CONVEYOR_AMQP_EPMD_PORT "rabbitmq (epmd)" epmd
  fi
}

pg_bin() { echo "/usr/lib/postgresql/15/bin/$1"; }
as_pg() { runuser -u "$PG_USER" -- "$@"; }

pg_running() { [ -f "$PG_DIR/data/postmaster.pid" ] && as_pg "$(pg_bin pg_ctl)" -D "$PG_DIR/data" status >/dev/null 2>&1; }

start_pg() {
  mkdir -p "$PG_DIR"
  chown "$PG_USER" "$PG_DIR"
  # postgres must be able to reach the folder: make every parent traversable
  local d="$PG_DIR"; while [ "$d" != "/" ]; do d="$(dirname "$d")"; chmod o+x "$d" 2>/dev/null || true; done
  if [ ! -f "$PG_DIR/data/PG_VERSION" ]; then
    log "initdb into $PG_DIR/data"
    as_pg "$(pg_bin initdb)" -D "$PG_DIR/data" -U postgres --auth-local=trust --auth-host=trust -E UTF8 >/dev/null
    mkdir -p "$PG_DIR/run"; chown "$PG_USER" "$PG_DIR/run"
    cat >> "$PG_DIR/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_DIR/run'
max_connections = 300
shared_buffers = 256MB
fsync = on
synchronous_commit = on
logging_collector = off
CONF
  fi
  if pg_running; then log "postgres already running on $PG_PORT"; else
    log "starting postgres on 127.0.0.1:$PG_PORT"
    # -p: the port of this start, whatever postgresql.conf was written with.
    as_pg "$(pg_bin pg_ctl)" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -o "-p $PG_PORT" -w -t 60 start >/dev/null
  fi
  for _ in $(seq 1 60); do
    if psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -Atqc 'select 1' >/dev/null 2>&1; then break; fi
    sleep 0.5
  done
  psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -Atqc \
    "DO \$\$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname='conveyor') THEN CREATE ROLE conveyor LOGIN CREATEDB; END IF; END \$\$;" >/dev/null
  if ! psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -Atqc "select 1 from pg_database where datname='conveyor'" | grep -q 1; then
    psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -qc "CREATE DATABASE conveyor OWNER conveyor" >/dev/null
  fi
}

mq_env() {
  export RABBITMQ_NODENAME="$NODE"
  export RABBITMQ_NODE_IP_ADDRESS="${CONVEYOR_AMQP_BIND:-127.0.0.1}"
  export RABBITMQ_NODE_PORT="$AMQP_PORT"
  export RABBITMQ_DIST_PORT="$DIST_PORT"
  # A private epmd: a standard node's epmd (4369) is neither needed nor touched.
  export ERL_EPMD_PORT="$EPMD_PORT"
  export RABBITMQ_MNESIA_BASE="$MQ_DIR/mnesia"
  export RABBITMQ_LOG_BASE="$MQ_DIR/log"
  export RABBITMQ_ENABLED_PLUGINS_FILE="$MQ_DIR/enabled_plugins"
  export RABBITMQ_CONFIG_FILE="$MQ_DIR/rabbitmq"
  export RABBITMQ_ADVANCED_CONFIG_FILE="$MQ_DIR/advanced.config"
  export RABBITMQ_PID_FILE="$MQ_DIR/rabbitmq.pid"
  export RABBITMQ_CONF_ENV_FILE="$MQ_DIR/rabbitmq-env.conf"
  export HOME="${HOME:-/root}"
}

mqctl() { mq_env; /usr/lib/rabbitmq/bin/rabbitmqctl -n "$NODE" "$@"; }
mq_running() { mqctl -q status >/dev/null 2>&1; }

start_mq() {
  mkdir -p "$MQ_DIR/mnesia" "$MQ_DIR/log"
  [ -f "$MQ_DIR/enabled_plugins" ] || echo '[].' > "$MQ_DIR/enabled_plugins"
  touch "$MQ_DIR/rabbitmq-env.conf"
  # consumer_timeout: long tasks are the worker's business (see docs/architecture.md); one hour here.
  cat > "$MQ_DIR/rabbitmq.conf" <<CONF
listeners.tcp.default = ${CONVEYOR_AMQP_BIND:-127.0.0.1}:$AMQP_PORT
consumer_timeout = ${CONVEYOR_AMQP_CONSUMER_TIMEOUT_MS:-3600000}
vm_memory_high_watermark.relative = 0.4
disk_free_limit.absolute = 500MB
log.console = false
log.file.level = warning
CONF
  echo '[].' > "$MQ_DIR/advanced.config"
  if mq_running; then log "rabbitmq already running on $AMQP_PORT"; return; fi
  log "starting rabbitmq node $NODE on 127.0.0.1:$AMQP_PORT"
  ( mq_env; nohup /usr/lib/rabbitmq/bin/rabbitmq-server > "$MQ_DIR/server.out" 2>&1 & )
  mq_env
  for _ in $(seq 1 120); do
    if /usr/lib/rabbitmq/bin/rabbitmqctl -n "$NODE" -q await_startup --timeout 5 >/dev/null 2>&1; then return; fi
    sleep 1
  done
  log "rabbitmq did not start; see $MQ_DIR/server.out and $MQ_DIR/log"; tail -20 "$MQ_DIR/server.out" >&2; exit 1
}

# Broker users and their passwords (under $LOCAL/amqp): scripts/broker-users.sh.
# shellcheck source=scripts/broker-users.sh
source "$ROOT/scripts/broker-users.sh"
mq_password() { broker_password "$LOCAL/amqp" "$1"; }
setup_mq_users() { broker_users mqctl "$LOCAL/amqp" "$MQ_DIR/mnesia/conveyor-users.sha"; }

amqp_url() { echo "amqp://conveyor-$1:$(mq_password "$1")@127.0.0.1:$AMQP_PORT/%2F"; }

stop_all() {
  if mq_running; then log "stopping rabbitmq"; mqctl -q stop >/dev/null 2>&1 || true; fi
  if pg_running; then log "stopping postgres"; as_pg "$(pg_bin pg_ctl)" -D "$PG_DIR/data" -m fast -w stop >/dev/null || true; fi
}

print_env() {
  echo "export CONVEYOR_DATABASE_URL='postgresql://conveyor@127.0.0.1:$PG_PORT/conveyor'"
  # The dispatcher's login is the default (conveyor dev, bench, conveyor dispatcher); a worker
  # or API process started by hand takes its own: CONVEYOR_AMQP_URL="$CONVEYOR_WORKER_AMQP_URL".
  echo "export CONVEYOR_AMQP_URL='$(amqp_url dispatcher)'"
  echo "export CONVEYOR_WORKER_AMQP_URL='$(amqp_url worker)'"
  echo "export CONVEYOR_API_AMQP_URL='$(amqp_url api)'"
  echo "export CONVEYOR_TEST_AMQP_ADMIN_URL='$(amqp_url admin)'"
  echo "export CONVEYOR_TEST_PG_ADMIN_URL='postgresql://postgres@127.0.0.1:$PG_PORT/postgres'"
  echo "export CONVEYOR_RABBITMQCTL='$ROOT/scripts/services.sh ctl'"
}

mq_pid() {
  mq_env
  local pid
  pid="$(cat "$RABBITMQ_PID_FILE" 2>/dev/null || true)"
  [ -n "$pid" ] || pid="$(pgrep -f "beam.smp.*-sname $NODE" | head -1 || true)"
  [ -n "$pid" ] || { log "no broker VM found for $NODE"; exit 1; }
  echo "$pid"
}

case "${1:-}" in
  start) install_packages; require_free_ports; start_pg; start_mq; setup_mq_users
         (umask 077; print_env > "$LOCAL/env"); log "ready: source $LOCAL/env";;
  stop) stop_all;;
  status) pg_running && echo "postgres: running on $PG_PORT" || echo "postgres: stopped"
          mq_running && echo "rabbitmq: running on $AMQP_PORT" || echo "rabbitmq: stopped";;
  env) print_env;;
  ctl) shift; mqctl "$@";;
  restart-mq) mqctl -q stop_app; mqctl -q start_app;;
  pg-crash) as_pg "$(pg_bin pg_ctl)" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -m immediate -w -t 60 restart >/dev/null;;
  mq-pid) mq_pid;;
  mq-kill) mq_env; pid="$(mq_pid)"
           kill -9 "$pid"; while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done; rm -f "$RABBITMQ_PID_FILE";;
  *) echo "usage: $0 start|stop|status|env|ctl ARGS...|restart-mq|pg-crash|mq-pid|mq-kill" >&2; exit 2;;
esac
