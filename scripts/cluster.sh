#!/usr/bin/env bash
# The fault suite's CLUSTER bed on one machine: a 3-node RabbitMQ cluster and a PostgreSQL primary
# with a streaming standby, as plain background processes under a git-ignored folder (like
# scripts/services.sh; no Docker, no systemd). Run as root: it makes network namespaces, a bridge
# and iptables rules. Every wait is bounded (CONVEYOR_CLUSTER_WAIT_S) and its failure names a log.
#
#   scripts/cluster.sh start            (idempotent) makes what is missing and starts what is down:
#                                       the network, the three nodes (fresh ones join node 1 with
#                                       stop_app, join_cluster, start_app), the broker users, the
#                                       primary and the standby; every port is checked before any
#                                       server starts; waits until the cluster is whole, every
#                                       AMQP port answers from the host and the standby streams;
#                                       writes $DIR/env (mode 600). About 20 s from nothing, 10 s
#                                       from stopped, 4 s when everything runs.
#   scripts/cluster.sh stop             heals any partition, stops the nodes (all at once: a node
#                                       left alone would pause), their epmd and postgres, and
#                                       removes the namespaces and the bridge; data stays
#   scripts/cluster.sh reset            stop, then wipe the data (brokers, postgres, env; the
#                                       passwords under $DIR/amqp stay): the next start makes a
#                                       fresh cluster and a fresh primary + standby (after a
#                                       promotion, the way back to a pair)
#   scripts/cluster.sh status           each node's state (running | paused | stopped, PARTITIONED)
#                                       with its own view of the cluster, each server's role, the
#                                       replication state
#   scripts/cluster.sh env              prints the export lines of $DIR/env
#   scripts/cluster.sh ctl N ARGS...    rabbitmqctl ARGS against node N, run inside its namespace
#                                       (so it answers while N is partitioned). Note that
#                                       `cluster_status` on a node blocks ~30 s while a peer is cut
#                                       off but not yet seen down; `status` does not.
#   scripts/cluster.sh node-kill N      kill -9 node N's Erlang VM; returns once it is gone
#   scripts/cluster.sh node-start N     starts node N; returns once it runs and every other running
#                                       node lists it as running (about 5 s)
#   scripts/cluster.sh node-restart N   graceful `rabbitmqctl stop` (waits for the VM to exit), then
#                                       node-start: one step of a rolling restart (about 6 s)
#   scripts/cluster.sh await            waits until the cluster is whole: every node's rabbit runs,
#                                       sees all three running and records no partition
#   scripts/cluster.sh leader QUEUE [VHOST]  prints the index (1..3) of the node leading that
#                                       quorum queue's Raft group, as a reachable node knows it
#                                       (VHOST /)
#   scripts/cluster.sh sync-registry    `dets:sync(ra_directory_reverse)` on every reachable node:
#                                       writes the quorum-queue registry to disk (RabbitMQ 3.10.8
#                                       forgets a queue declared < ~2 s before a kill -9 otherwise;
#                                       see FaultBed.persistQueueRegistrations). Call it after the
#                                       queues are declared and before a node-kill.
#   scripts/cluster.sh partition N [--wait]  cuts node N off the other two AND off every client:
#                                       each packet in or out of its namespace's link is dropped, no
#                                       socket is closed. --wait: returns once the other nodes see
#                                       it down (about 16 s: net_ticktime) and prints the seconds
#   scripts/cluster.sh heal N [--no-wait]  lets node N's packets through again; then (unless
#                                       --no-wait) waits until the cluster is whole and prints the
#                                       seconds (about 2.5 s, or ~17 s when the kick below is needed)
#   scripts/cluster.sh pg-kill-primary  kill -9 of the current primary's postmaster and of its
#                                       children together (a machine's death, nearly: the kernel
#                                       still resets the clients' sockets); returns once all are gone
#   scripts/cluster.sh pg-promote       promotes the standby; returns once it accepts writes (about
#                                       0.2 s). The old primary is retired: start leaves it down
#                                       until `reset`. (Without a promotion, start restarts a killed
#                                       primary, which recovers from its WAL.)
#   scripts/cluster.sh pg-primary       prints the port of the server that accepts writes (exit 1:
#                                       none does)
#   scripts/cluster.sh pg-sync on|off   synchronous replication on the primary (see below)
#
# RabbitMQ. Node N (1..3) is conveyor-N@$NET.1N with Erlang long names (an IP as host part, so no
# DNS is needed; the CLI names itself rabbitmqcli-PID-conveyor-N@<same IP>) and runs in network
# namespace ${NS}N, joined to the host by a veth pair (${NS}N-n inside, ${NS}N-h on the host)
# enslaved to the bridge ${NS}-br, which holds the host's address $NET.1/24. The nodes reach each
# other across the bridge, and processes on the host reach every node at $NET.1N (the URLs in
# env). `partition N` inserts iptables DROP rules for the link ${NS}N-n inside namespace N (INPUT
# -i, OUTPUT -o): node N keeps its loopback, so `ctl N` still answers, while the other nodes and
# every client lose it with their sockets open (as fault scenario 3 does to a worker; its
# 10.77.0.0/24 is not ours). Each namespace runs its own epmd, started by its node, on the same
# port. Cluster settings: cluster_partition_handling = pause_minority (the node that is cut off
# stops its rabbit application once it counts its peers down, closing its clients' connections as
# soon as packets flow again, and starts it again by itself once it sees a majority);
# net_ticktime (an Erlang connection silent that long, +-25%, counts its node down: with 15 s the
# cluster notices a partition after ~16 s; a shorter cut is no partition to RabbitMQ, though a
# quorum queue whose leader is cut off elects another after ~10 s); consumer_timeout as the fault
# bed's; cluster_name conveyor-cluster. Quorum queues: the initial group is rabbit's
# quorum_cluster_size (3 by default in 3.10.8, set explicitly in advanced.config; 3.10's
# rabbitmq.conf has no key for it), taken from ALL cluster members, running or not, so a queue
# declared while a node is down still gets 3 members; a client may send
# x-quorum-initial-group-size for fewer. The first leader is the declaring node (client-local);
# a member that restarts can take the leadership over. Broker users: those of
# scripts/services.sh (conveyor-admin, -dispatcher, -worker, -api from
# deploy/broker-permissions.tsv, {p} = [^.]+), created once on node 1 (users replicate);
# passwords under $DIR/amqp (mode 600); guest is deleted.
#
# RabbitMQ 3.10.8 on Erlang 25.2 (Debian 12's pair) can leave a node that starts its rabbit again
# (after a partition: 4 heals of 18 here, all with AMQP clients connected during the cut, 4 of
# 10 such; or a restart) hanging in global:sync; see kick_global.
# heal, await and every node start kick such a node after CONVEYOR_CLUSTER_GLOBAL_KICK_S and log
# "stuck in global:sync" when they do (0: never; the node then stays paused).
#
# PostgreSQL 15. Server 1 (the primary, initdb'd like scripts/services.sh: trust, role conveyor
# LOGIN CREATEDB owning database conveyor, fsync and synchronous_commit on, max_connections 300,
# wal_level replica, wal_log_hints, replication from 127.0.0.1) and server 2, its standby made by
# `pg_basebackup -R` streaming from physical slot conveyor_standby (application_name
# conveyor_standby). Both on 127.0.0.1, run as postgres. Synchronous replication
# (CONVEYOR_CLUSTER_PG_SYNC=1, the default, applied by every start; `pg-sync on|off` changes it
# while running): synchronous_standby_names = 'conveyor_standby' on the primary, so with
# synchronous_commit = on a commit returns only once the standby has flushed it: a promotion
# loses no acknowledged transaction, but while the standby is down every commit on the primary
# waits (a client that gives up waiting has still committed on the primary). Asynchronous (=0):
# commits return before the standby has them; a kill of the primary followed by a promotion loses
# whatever the standby had not yet received (usually milliseconds of commits, unbounded under
# load or when the standby lags): acknowledged writes vanish. Clients connect with a libpq
# multi-host URL and target_session_attrs=read-write (libpq tries the hosts in order and keeps
# the first that accepts writes).
#
# $DIR/env exports (source it):
#   CONVEYOR_CLUSTER_AMQP_URLS_DISPATCHER, _WORKER, _API, _ADMIN  each role's login at the three
#       nodes: amqp://conveyor-ROLE:PASSWORD@$NET.1N:PORT_N/%2F, comma-separated, node 1 first
#   CONVEYOR_CLUSTER_DATABASE_URL  postgresql://conveyor@127.0.0.1:P1,127.0.0.1:P2/conveyor?target_session_attrs=read-write
#   CONVEYOR_CLUSTER_PG_ADMIN_URL  the same for postgres, database postgres
#   CONVEYOR_CLUSTER_AMQP_HOST_1..3, CONVEYOR_CLUSTER_AMQP_PORT_1..3  each node's AMQP address
#   CONVEYOR_CLUSTER_PG_PORT_1, _2  the servers' ports
#   CONVEYOR_CLUSTER_SCRIPT        this script (for the suite: `$CONVEYOR_CLUSTER_SCRIPT partition 2`)
#
# Variables (defaults): CONVEYOR_CLUSTER_DIR ($ROOT/.local/cluster; git-ignored),
# CONVEYOR_CLUSTER_AMQP_PORT_1..3 (26701..26703), CONVEYOR_CLUSTER_DIST_PORT_1..3 (26711..26713,
# Erlang distribution), CONVEYOR_CLUSTER_EPMD_PORT (26720, one epmd per namespace),
# CONVEYOR_CLUSTER_PG_PORT_1 (26731, primary), CONVEYOR_CLUSTER_PG_PORT_2 (26732, standby),
# CONVEYOR_CLUSTER_NET (10.78.0: the /24 of the bridge; changing it needs a reset, the node names
# hold it), CONVEYOR_CLUSTER_NETNS (cvc: namespaces cvc1..3, bridge cvc-br),
# CONVEYOR_CLUSTER_PG_SYNC (1), CONVEYOR_AMQP_CONSUMER_TIMEOUT_MS (20000),
# CONVEYOR_CLUSTER_NET_TICKTIME (15 s; Erlang's default 60 would let a 30 s partition go unnoticed
# by the cluster), CONVEYOR_CLUSTER_PARTITION_HANDLING (pause_minority),
# CONVEYOR_CLUSTER_GLOBAL_KICK_S (15), CONVEYOR_CLUSTER_WAIT_S (120: the bound of every wait).
# The ports sit below Linux's ephemeral range (see scripts/services.sh) and clear of the other
# pairs (55432, 55672-55674, 26432, 26672-26674). The AMQP, distribution and epmd ports are bound
# inside the namespaces, so they are checked there; the postgres ports on the host. A taken port
# stops start, before any server starts, naming port, holder and variable.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${CONVEYOR_CLUSTER_DIR:-$ROOT/.local/cluster}"
NS="${CONVEYOR_CLUSTER_NETNS:-cvc}"
NET="${CONVEYOR_CLUSTER_NET:-10.78.0}"
BRIDGE="$NS-br"
HOST_ADDR="$NET.1"
EPMD_PORT="${CONVEYOR_CLUSTER_EPMD_PORT:-26720}"
PG_PORT_1="${CONVEYOR_CLUSTER_PG_PORT_1:-26731}"
PG_PORT_2="${CONVEYOR_CLUSTER_PG_PORT_2:-26732}"
PG_SYNC="${CONVEYOR_CLUSTER_PG_SYNC:-1}"
CONSUMER_TIMEOUT="${CONVEYOR_AMQP_CONSUMER_TIMEOUT_MS:-20000}"
TICKTIME="${CONVEYOR_CLUSTER_NET_TICKTIME:-15}"
PARTITION_HANDLING="${CONVEYOR_CLUSTER_PARTITION_HANDLING:-pause_minority}"
WAIT="${CONVEYOR_CLUSTER_WAIT_S:-120}"
KICK_S="${CONVEYOR_CLUSTER_GLOBAL_KICK_S:-15}"
MQ_DIR="$DIR/rabbitmq"
PG_DIR="$DIR/pg"
PG_USER=postgres
STANDBY=conveyor_standby
RABBITMQ_BIN=/usr/lib/rabbitmq/bin
NODES=(1 2 3)

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# naming

# The value of variable PREFIX_N, or DEFAULT.
per_node() { local v="$1_$2"; echo "${!v:-$3}"; }
amqp_port() { per_node CONVEYOR_CLUSTER_AMQP_PORT "$1" $((26700 + $1)); }
dist_port() { per_node CONVEYOR_CLUSTER_DIST_PORT "$1" $((26710 + $1)); }
node_addr() { echo "$NET.$((10 + $1))"; }
node_name() { echo "conveyor-$1@$(node_addr "$1")"; }
netns() { echo "$NS$1"; }
node_dir() { echo "$MQ_DIR/$1"; }
pg_port() { if [ "$1" = 1 ]; then echo "$PG_PORT_1"; else echo "$PG_PORT_2"; fi; }
pg_data() { echo "$PG_DIR/$1/data"; }

check_node() {
  case "${1:-}" in 1|2|3) ;; *) die "a node is 1, 2 or 3 (got '${1:-}')";; esac
}

# Polls `cond ARGS...` every STEP seconds until it succeeds or LIMIT seconds pass (then dies
# with WHAT). Prints nothing; returns 0 on success.
wait_for() {
  local limit="$1" step="$2" what="$3"; shift 3
  local start=$SECONDS
  until "$@"; do
    if (( SECONDS - start >= limit )); then die "$what (waited ${limit}s)"; fi
    sleep "$step"
  done
}

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# ---------------------------------------------------------------------------------------------
# ports

# Like scripts/services.sh: a port about to be listened on must be free, or the server would fail
# later with a message about something else. PREFIX (e.g. `ip netns exec cvc1`) runs ss where
# the port lives. A process named ALLOW (epmd) is no conflict.
require_free_port() {
  local port="$1" variable="$2" what="$3" allow="$4"; shift 4
  local held who
  held="$("$@" ss -Hltnp "sport = :$port" 2>/dev/null || true)"
  [ -n "$held" ] || return 0
  if [ -n "$allow" ] && grep -q "\"$allow\"" <<< "$held"; then return 0; fi
  who="$(grep -o 'users:(([^)]*))' <<< "$held" | head -1)"
  log "cannot start $what: port $port is already in use by ${who:-another process}"
  log "  $(head -1 <<< "$held" | tr -s ' ')"
  die "  choose another port: $variable=<free port> $0 start"
}

# A node's ports live in its namespace (net_up first).
require_free_node_ports() {
  local n="$1" ns; ns="$(netns "$1")"
  require_free_port "$(amqp_port "$n")" "CONVEYOR_CLUSTER_AMQP_PORT_$n" "node $n (AMQP)" "" ip netns exec "$ns"
  require_free_port "$(dist_port "$n")" "CONVEYOR_CLUSTER_DIST_PORT_$n" "node $n (distribution)" "" ip netns exec "$ns"
  require_free_port "$EPMD_PORT" CONVEYOR_CLUSTER_EPMD_PORT "node $n (epmd)" epmd ip netns exec "$ns"
}

# Every port of a server that is not running yet, before any starts: a clash stops start with
# nothing started.
require_free_ports() {
  local n i
  for n in "${NODES[@]}"; do vm_alive "$n" || require_free_node_ports "$n"; done
  for i in 1 2; do pg_running "$i" || require_free_port "$(pg_port "$i")" "CONVEYOR_CLUSTER_PG_PORT_$i" "postgres $i" ""; done
}

# ---------------------------------------------------------------------------------------------
# network: bridge, namespaces, partitions

ns_exists() { [ -e "/run/netns/$1" ]; }

net_up() {
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    if [ -n "$(ip -4 route show to "$NET.0/24")" ]; then
      die "$NET.0/24 is already routed on this machine ($(ip -4 route show to "$NET.0/24")); choose another: CONVEYOR_CLUSTER_NET=10.x.y"
    fi
    [ "${#BRIDGE}" -le 15 ] || die "CONVEYOR_CLUSTER_NETNS='$NS' is too long for interface names"
    ip link add "$BRIDGE" type bridge
    ip addr add "$HOST_ADDR/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
  fi
  local n ns
  for n in "${NODES[@]}"; do
    ns="$(netns "$n")"
    ns_exists "$ns" || ip netns add "$ns"
    if ! ip link show "$ns-h" >/dev/null 2>&1; then
      ip -n "$ns" link del "$ns-n" 2>/dev/null || true
      ip link add "$ns-h" type veth peer name "$ns-n"
      ip link set "$ns-n" netns "$ns"
      ip link set "$ns-h" master "$BRIDGE"
      ip link set "$ns-h" up
      ip -n "$ns" addr add "$(node_addr "$n")/24" dev "$ns-n"
      ip -n "$ns" link set "$ns-n" up
      ip -n "$ns" link set lo up
    fi
  done
}

net_down() {
  local n ns
  for n in "${NODES[@]}"; do
    ns="$(netns "$n")"
    ip link del "$ns-h" 2>/dev/null || true
    if ns_exists "$ns"; then ip netns del "$ns"; fi
  done
  ip link del "$BRIDGE" 2>/dev/null || true
}

ipt() { local n="$1"; shift; ip netns exec "$(netns "$n")" iptables -w 10 "$@"; }

partitioned() {
  local n="$1"
  ns_exists "$(netns "$n")" && ipt "$n" -C INPUT -i "$(netns "$n")-n" -j DROP 2>/dev/null
}

drop() {
  local n="$1" on="$2" dev; dev="$(netns "$n")-n"
  if [ "$on" = on ]; then
    ipt "$n" -C INPUT -i "$dev" -j DROP 2>/dev/null || ipt "$n" -I INPUT -i "$dev" -j DROP
    ipt "$n" -C OUTPUT -o "$dev" -j DROP 2>/dev/null || ipt "$n" -I OUTPUT -o "$dev" -j DROP
  else
    while ipt "$n" -C INPUT -i "$dev" -j DROP 2>/dev/null; do ipt "$n" -D INPUT -i "$dev" -j DROP; done
    while ipt "$n" -C OUTPUT -o "$dev" -j DROP 2>/dev/null; do ipt "$n" -D OUTPUT -o "$dev" -j DROP; done
  fi
}

# ---------------------------------------------------------------------------------------------
# RabbitMQ

mq_env() {
  local n="$1" d; d="$(node_dir "$n")"
  export RABBITMQ_NODENAME; RABBITMQ_NODENAME="$(node_name "$n")"
  export RABBITMQ_USE_LONGNAME=true
  export RABBITMQ_NODE_IP_ADDRESS; RABBITMQ_NODE_IP_ADDRESS="$(node_addr "$n")"
  export RABBITMQ_NODE_PORT; RABBITMQ_NODE_PORT="$(amqp_port "$n")"
  export RABBITMQ_DIST_PORT; RABBITMQ_DIST_PORT="$(dist_port "$n")"
  # The namespace's own epmd (started by the node), on this port inside every namespace.
  export ERL_EPMD_PORT="$EPMD_PORT"
  export RABBITMQ_MNESIA_BASE="$d/mnesia"
  export RABBITMQ_LOG_BASE="$d/log"
  export RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins"
  export RABBITMQ_CONFIG_FILE="$d/rabbitmq"
  export RABBITMQ_ADVANCED_CONFIG_FILE="$d/advanced.config"
  export RABBITMQ_PID_FILE="$d/rabbitmq.pid"
  export RABBITMQ_CONF_ENV_FILE="$d/rabbitmq-env.conf"
  export HOME="${HOME:-/root}"
}

# rabbitmqctl against node N, from inside its namespace (its loopback: works while partitioned).
# Bounded by `timeout`; stdin closed (rabbitmqctl reads it).
mqctl() {
  local n="$1"; shift
  (
    mq_env "$n"
    timeout 60 ip netns exec "$(netns "$n")" "$RABBITMQ_BIN/rabbitmqctl" -n "$(node_name "$n")" "$@" </dev/null
  )
}

# The node's Erlang VM: the pid file's process, else a search of the namespace's processes; a
# beam.smp booting rabbit (3.10 names the node at runtime, not on the command line) inside node
# N's namespace (a CLI's beam there does not boot rabbit). Fails when there is none.
vm_pid() {
  local n="$1" ns p candidates=(); ns="$(netns "$n")"
  ns_exists "$ns" || return 1
  if [ -s "$(node_dir "$n")/rabbitmq.pid" ]; then candidates+=("$(cat "$(node_dir "$n")/rabbitmq.pid")"); fi
  mapfile -t -O "${#candidates[@]}" candidates < <(ip netns pids "$ns" 2>/dev/null)
  for p in "${candidates[@]}"; do
    if [ "$(cat "/proc/$p/comm" 2>/dev/null)" = beam.smp ] &&
       tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | grep -q -- '-s rabbit boot' &&
       [ "$(ip netns identify "$p" 2>/dev/null)" = "$ns" ]; then
      echo "$p"; return 0
    fi
  done
  return 1
}
vm_alive() { vm_pid "$1" >/dev/null; }
vm_gone() { ! vm_alive "$1"; }

# running | paused (VM up, rabbit stopped: pause_minority, or booting) | stopped | unreachable
node_state() {
  local n="$1" out
  vm_alive "$n" || { echo stopped; return; }
  out="$(mqctl "$n" -q eval 'rabbit:is_running().' 2>/dev/null || true)"
  case "$out" in true) echo running;; false) echo paused;; *) echo unreachable;; esac
}

write_mq_config() {
  local n="$1" d; d="$(node_dir "$n")"
  mkdir -p "$d/mnesia" "$d/log"
  [ -f "$d/enabled_plugins" ] || echo '[].' > "$d/enabled_plugins"
  touch "$d/rabbitmq-env.conf"
  cat > "$d/rabbitmq.conf" <<CONF
listeners.tcp.default = $(node_addr "$n"):$(amqp_port "$n")
consumer_timeout = $CONSUMER_TIMEOUT
cluster_name = conveyor-cluster
cluster_partition_handling = $PARTITION_HANDLING
net_ticktime = $TICKTIME
vm_memory_high_watermark.relative = 0.2
disk_free_limit.absolute = 500MB
log.console = false
log.file.level = info
CONF
  # quorum_cluster_size: a new quorum queue's initial Raft group (3.10.8's default, explicit).
  echo '[{rabbit, [{quorum_cluster_size, 3}]}].' > "$d/advanced.config"
}

# Starts node N's VM in its namespace, in a session of its own (it outlives this script).
launch_node() {
  local n="$1" d ns; d="$(node_dir "$n")"; ns="$(netns "$n")"
  write_mq_config "$n"
  require_free_node_ports "$n"
  rm -f "$d/rabbitmq.pid"
  log "starting node $n: $(node_name "$n"), AMQP $(node_addr "$n"):$(amqp_port "$n")"
  (
    mq_env "$n"
    # 9>&-: the VM must not inherit the lock of with_lock.
    setsid ip netns exec "$ns" "$RABBITMQ_BIN/rabbitmq-server" > "$d/server.out" 2>&1 < /dev/null 9>&- &
    echo $! > "$d/launcher.pid"
  )
}

# RabbitMQ 3.10.8 on Erlang 25.2 (Debian 12's pair): a node whose rabbit starts again after a
# partition (pause_minority's recovery) or a restart can hang for good in its boot step
# `rabbit_node_monitor:global_sync/0` (global:sync/0): Erlang's `global` on that node stays
# unsynced with a peer it is connected to. RabbitMQ's own "Global hang workaround" fires after
# 20 s but fakes nodedown/nodeup messages that OTP 25's global_name_server drops ("received an
# unexpected message"), so the node stays paused. Seen here after a 30 s partition. The kick:
# on node N, if a process sits in global_sync, disconnect and reconnect every connected peer
# that global has not synced with (a real nodedown/nodeup); global then syncs at once. Prints
# the peers kicked; silent when node N is not stuck.
kick_global() {
  local n="$1" out
  out="$(mqctl "$n" -q eval '
    Stuck = [P || P <- processes(),
                  {current_stacktrace, St} <- [catch erlang:process_info(P, current_stacktrace)],
                  lists:any(fun(F) -> element(1, F) =:= rabbit_node_monitor andalso element(2, F) =:= global_sync end, St)],
    case Stuck of
      [] -> none;
      _ -> Synced = element(4, sys:get_state(global_name_server, 5000)),
           Peers = [X || X <- nodes(), not lists:member(X, Synced)],
           [begin erlang:disconnect_node(X), timer:sleep(200), net_kernel:connect_node(X) end || X <- Peers],
           {kicked, Peers}
    end.' 2>/dev/null || true)"
  case "$out" in
    "{kicked,"*) log "node $n was stuck in global:sync (RabbitMQ 3.10.8 / Erlang 25.2 global hang); reconnected it to $(tr -d '\n' <<< "$out" | grep -o "conveyor-[0-9]" | sed 's/conveyor-/node /' | paste -sd, | sed 's/,/, /g')";;
  esac
}

# Waits until node N's rabbit application runs; dies early if its VM exits. Kicks a boot stuck
# in global:sync (kick_global) after CONVEYOR_CLUSTER_GLOBAL_KICK_S.
await_node() {
  local n="$1" start=$SECONDS d last=0; d="$(node_dir "$n")"
  until mqctl "$n" -q await_startup --timeout 5 >/dev/null 2>&1; do
    if [ "$KICK_S" -gt 0 ] && (( SECONDS - start >= KICK_S && SECONDS - last >= 10 )); then kick_global "$n"; last=$SECONDS; fi
    if ! vm_alive "$n" && ! kill -0 "$(cat "$d/launcher.pid" 2>/dev/null || echo 0)" 2>/dev/null; then
      tail -20 "$d/server.out" >&2 || true
      die "node $n exited while starting; see $d/server.out and $d/log/"
    fi
    if (( SECONDS - start >= WAIT )); then
      die "node $n did not start within ${WAIT}s; see $d/server.out and $d/log/$(node_name "$n").log"
    fi
    sleep 1
  done
}

# Node N's own view of the cluster, from its local state only (mnesia's running nodes, its
# partition list: no call to another node, so it answers at once during a partition, unlike
# `rabbitmqctl cluster_status`, which waits ~30 s on a node that is cut off but not yet seen
# down). One line each, nodes as indexes: `app running|stopped`, `running 1 2 3`,
# `disk 1 2 3`, `partitions` (empty when none).
cluster_view() {
  local n="$1"
  mqctl "$n" -q eval '
    Ix = fun(L) -> lists:join(" ", [hd(string:tokens(lists:nthtail(9, atom_to_list(X)), "@")) || X <- lists:sort(L)]) end,
    {_, D, R} = rabbit_mnesia:cluster_nodes(status),
    P = try rabbit_node_monitor:partitions() catch _:_ -> [] end,
    A = case rabbit:is_running() of true -> "running"; false -> "stopped" end,
    io:format("app ~s~nrunning ~s~ndisk ~s~npartitions ~s~n", [A, Ix(R), Ix(D), Ix(P)]),
    done.' 2>/dev/null | grep -v '^done$' | sed 's/ *$//'
  [ "${PIPESTATUS[0]}" = 0 ]
}

joined() { cluster_view "$1" | grep -q '^disk 1\( \|$\)'; }

join_node() {
  local n="$1"
  [ "$n" != 1 ] || return 0
  joined "$n" && return 0
  log "node $n joins node 1"
  local out
  # join_cluster prints harmless "[error] Failed to create a tracked connection table" lines
  # (3.10: the joining node is down for a moment); shown only when the join fails.
  out="$(mqctl "$n" -q stop_app 2>&1 && mqctl "$n" -q join_cluster "$(node_name 1)" 2>&1 && mqctl "$n" -q start_app 2>&1)" \
    || { echo "$out" >&2; die "node $n could not join node 1; see $(node_dir "$n")/log/"; }
  await_node "$n"
}

# The cluster is whole: every node's rabbit runs and sees the three running, no partition.
whole() {
  local n view
  for n in "${NODES[@]}"; do
    partitioned "$n" && return 1
    view="$(cluster_view "$n")" || return 1
    grep -qx 'app running' <<< "$view" || return 1
    grep -qx 'running 1 2 3' <<< "$view" || return 1
    grep -qx 'partitions' <<< "$view" || return 1
  done
}

# Waits until the cluster is whole; kicks a node stuck in global:sync (kick_global) once it has
# waited CONVEYOR_CLUSTER_GLOBAL_KICK_S: node N, or every node when none is named.
await_whole() {
  local start=$SECONDS last=0 m targets=("${NODES[@]}")
  if [ -n "${1:-}" ]; then targets=("$1"); fi
  until whole; do
    if (( SECONDS - start >= WAIT )); then die "the cluster is not whole after ${WAIT}s; see $MQ_DIR/N/log/ and $0 status"; fi
    if [ "$KICK_S" -gt 0 ] && (( SECONDS - start >= KICK_S && SECONDS - last >= 10 )); then
      for m in "${targets[@]}"; do if vm_alive "$m"; then kick_global "$m"; fi; done
      last=$SECONDS
    fi
    sleep 1
  done
}

# Node N is seen down by every other node that is up and not cut off itself.
seen_down() {
  local n="$1" m asked=0
  for m in "${NODES[@]}"; do
    [ "$m" != "$n" ] || continue
    if ! vm_alive "$m" || partitioned "$m"; then continue; fi
    if cluster_view "$m" | grep -q "^running.* $n\( \|$\)"; then return 1; fi
    asked=1
  done
  [ "$asked" = 1 ]
}

# Node N runs and appears among the running nodes of the other running nodes.
rejoined() {
  local n="$1" m
  cluster_view "$n" | grep -qx 'app running' || return 1
  for m in "${NODES[@]}"; do
    [ "$m" != "$n" ] || continue
    partitioned "$m" && continue
    [ "$(node_state "$m")" = running ] || continue
    cluster_view "$m" | grep -q "^running.* $n\( \|$\)" || return 1
  done
}

# A node that answers for the cluster: running and not cut off.
reachable_node() {
  local n
  for n in "${NODES[@]}"; do
    if ! partitioned "$n" && [ "$(node_state "$n")" = running ]; then echo "$n"; return 0; fi
  done
  return 1
}

# scripts/services.sh's users and permissions (scripts/broker-users.sh), once for the cluster
# (users replicate), through node 1; passwords under $DIR/amqp.
# shellcheck source=scripts/broker-users.sh
source "$ROOT/scripts/broker-users.sh"
mq_password() { broker_password "$DIR/amqp" "$1"; }
mqctl_1() { mqctl 1 "$@"; }
setup_users() { broker_users mqctl_1 "$DIR/amqp" "$MQ_DIR/conveyor-users.sha"; }

# Something on the host accepts TCP connections at ADDR:PORT (the way the clients come).
tcp_open() { timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; }

start_mq() {
  local n
  # All at once: a node that was clustered waits at boot for its peers' tables.
  for n in "${NODES[@]}"; do
    if partitioned "$n"; then log "node $n is partitioned; healing it first"; drop "$n" off; fi
    vm_alive "$n" || launch_node "$n"
  done
  for n in "${NODES[@]}"; do await_node "$n"; done
  for n in "${NODES[@]}"; do join_node "$n"; done
  setup_users
  await_whole
  for n in "${NODES[@]}"; do
    wait_for 30 1 "node $n's AMQP port $(node_addr "$n"):$(amqp_port "$n") does not answer from the host" \
      tcp_open "$(node_addr "$n")" "$(amqp_port "$n")"
  done
}

node_kill() {
  local n="$1" pid
  pid="$(vm_pid "$n")" || { log "node $n is not running"; return 0; }
  kill -9 "$pid"
  wait_for 30 0.1 "node $n's VM $pid survived kill -9" vm_gone "$n"
  rm -f "$(node_dir "$n")/rabbitmq.pid"
  log "node $n killed (VM $pid)"
}

node_start() {
  local n="$1" t0; t0="$(now)"
  net_up
  vm_alive "$n" || launch_node "$n"
  await_node "$n"
  wait_for "$WAIT" 1 "node $n runs but is not in the cluster; see $(node_dir "$n")/log/" rejoined "$n"
  log "node $n running in the cluster after $(since "$t0")s"
}

node_stop() {
  local n="$1" pid
  pid="$(vm_pid "$n")" || return 0
  mqctl "$n" -q stop >/dev/null 2>&1 || true
  wait_for "$WAIT" 0.2 "node $n's VM $pid did not stop; see $(node_dir "$n")/log/" vm_gone "$n"
}

# Kills the epmd daemons the nodes started in their namespaces (nothing else lives there).
stop_epmd() {
  local n p
  for n in "${NODES[@]}"; do
    ns_exists "$(netns "$n")" || continue
    for p in $(ip netns pids "$(netns "$n")" 2>/dev/null); do
      if [ "$(cat "/proc/$p/comm" 2>/dev/null)" = epmd ]; then kill "$p" 2>/dev/null || true; fi
    done
  done
}

stop_mq() {
  local n
  for n in "${NODES[@]}"; do if partitioned "$n"; then drop "$n" off; fi; done
  for n in "${NODES[@]}"; do
    if vm_alive "$n"; then log "stopping node $n"; node_stop "$n" & fi
  done
  wait
  # A node that did not stop within the bound: its VM goes the hard way.
  for n in "${NODES[@]}"; do
    if vm_alive "$n"; then log "node $n did not stop; kill -9"; node_kill "$n"; fi
  done
  stop_epmd
  sleep 0.2
  net_down
}

leader() {
  local queue="$1" vhost="${2:-/}" n out
  n="$(reachable_node)" || die "no node is running and reachable"
  # Ra's own view (the amqqueue record's pid, which list_queues shows as leader, can lag an
  # election): the leader known on the asked node (ra_leaderboard, a local table its Raft
  # member keeps; ra:members would ask the leader itself and time out while it is cut off), or
  # on another member that is connected when the asked node holds none.
  out="$(mqctl "$n" -q eval "
    case rabbit_amqqueue:lookup(rabbit_misc:r(<<\"$vhost\">>, queue, <<\"$queue\">>)) of
      {ok, Q} -> case amqqueue:get_type(Q) of
          rabbit_quorum_queue ->
            {Name, _} = amqqueue:get_pid(Q),
            #{nodes := Members} = amqqueue:get_type_state(Q),
            Ask = case lists:member(node(), Members) of
                    true -> node();
                    false -> hd([M || M <- Members, lists:member(M, nodes())] ++ Members)
                  end,
            case rpc:call(Ask, ra_leaderboard, lookup_leader, [Name], 5000) of
              {_, L} when is_atom(L) -> L;
              Other -> {error, {no_leader_known, Other}}
            end;
          T -> {error, {not_a_quorum_queue, T}}
        end;
      E -> E
    end.")" || die "node $n did not answer"
  case "$out" in
    "'conveyor-"*@*) sed -E "s/^'conveyor-([0-9]+)@.*$/\1/" <<< "$out";;
    *) die "no leader for queue '$queue' in vhost '$vhost': $out";;
  esac
}

sync_registry() {
  local n out status=0
  for n in "${NODES[@]}"; do
    if partitioned "$n" || [ "$(node_state "$n")" != running ]; then log "node $n skipped (not running or cut off)"; continue; fi
    out="$(mqctl "$n" -q eval 'dets:sync(ra_directory_reverse).' 2>&1 || true)"
    echo "node $n: $out"
    [ "$out" = ok ] || status=1
  done
  return $status
}

# ---------------------------------------------------------------------------------------------
# PostgreSQL

pg_bin() { echo "/usr/lib/postgresql/15/bin/$1"; }
as_pg() { runuser -u "$PG_USER" -- "$@"; }
pg_running() { [ -f "$(pg_data "$1")/postmaster.pid" ] && as_pg "$(pg_bin pg_ctl)" -D "$(pg_data "$1")" status >/dev/null 2>&1; }
psql_at() { local i="$1"; shift; psql -h 127.0.0.1 -p "$(pg_port "$i")" -U postgres -d postgres -AtqX "$@"; }
pg_accepts() { psql_at "$1" -c 'select 1' >/dev/null 2>&1; }
# primary | standby | down
pg_role() {
  local r; r="$(psql_at "$1" -c 'select pg_is_in_recovery()' 2>/dev/null || true)"
  case "$r" in f) echo primary;; t) echo standby;; *) echo down;; esac
}
pg_writable() { [ "$(pg_role "$1")" = primary ]; }
promoted() { cat "$PG_DIR/promoted" 2>/dev/null || true; }

pg_prepare_dirs() {
  mkdir -p "$PG_DIR/1/run" "$PG_DIR/2/run"
  chown "$PG_USER" "$PG_DIR" "$PG_DIR/1" "$PG_DIR/2" "$PG_DIR/1/run" "$PG_DIR/2/run"
  # postgres must be able to reach the folder: make every parent traversable
  local d="$PG_DIR"; while [ "$d" != "/" ]; do d="$(dirname "$d")"; chmod o+x "$d" 2>/dev/null || true; done
}

pg_start_server() {
  local i="$1"
  pg_running "$i" && return 0
  require_free_port "$(pg_port "$i")" "CONVEYOR_CLUSTER_PG_PORT_$i" "postgres $i" ""
  # After a kill -9, the old postmaster may still be an unreaped zombie, which postgres would take
  # for a live server holding postmaster.pid.
  local old; old="$(head -1 "$(pg_data "$i")/postmaster.pid" 2>/dev/null || true)"
  if [ -n "$old" ]; then wait_for 30 0.1 "postgres $i's old postmaster $old is still there" pid_reaped "$old"; fi
  log "starting postgres $i on 127.0.0.1:$(pg_port "$i")"
  # -p: the port of this start, whatever postgresql.conf was written with.
  as_pg "$(pg_bin pg_ctl)" -D "$(pg_data "$i")" -l "$PG_DIR/$i/postgres.log" -o "-p $(pg_port "$i")" -w -t "$WAIT" start >/dev/null 9>&- \
    || die "postgres $i did not start; see $PG_DIR/$i/postgres.log"
  wait_for "$WAIT" 0.5 "postgres $i does not accept connections; see $PG_DIR/$i/postgres.log" pg_accepts "$i"
}

pg_init_primary() {
  local data; data="$(pg_data 1)"
  [ -f "$data/PG_VERSION" ] && return 0
  log "initdb into $data"
  as_pg "$(pg_bin initdb)" -D "$data" -U postgres --auth-local=trust --auth-host=trust -E UTF8 >/dev/null
  cat >> "$data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT_1
unix_socket_directories = '$PG_DIR/1/run'
max_connections = 300
shared_buffers = 256MB
fsync = on
synchronous_commit = on
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
hot_standby = on
wal_log_hints = on
logging_collector = off
CONF
  if ! grep -Eq '^host[[:space:]]+replication[[:space:]]+all[[:space:]]+127\.0\.0\.1/32' "$data/pg_hba.conf"; then
    echo "host replication all 127.0.0.1/32 trust" >> "$data/pg_hba.conf"
  fi
}

pg_init_standby() {
  local data; data="$(pg_data 2)"
  [ -f "$data/PG_VERSION" ] && return 0
  log "pg_basebackup of postgres 1 into $data (slot $STANDBY)"
  psql_at 1 -c "select pg_drop_replication_slot('$STANDBY') from pg_replication_slots where slot_name = '$STANDBY' and not active" >/dev/null
  rm -rf "$data"
  as_pg "$(pg_bin pg_basebackup)" -h 127.0.0.1 -p "$PG_PORT_1" -U postgres -D "$data" \
    -R -X stream -C -S "$STANDBY" -c fast >/dev/null || die "pg_basebackup failed; see $PG_DIR/1/postgres.log"
  # The standby's own port and socket; its name for synchronous_standby_names; no copied
  # synchronous_standby_names (it would hold every commit once it is promoted).
  cat >> "$data/postgresql.conf" <<CONF
# server 2, the standby (scripts/cluster.sh)
port = $PG_PORT_2
unix_socket_directories = '$PG_DIR/2/run'
CONF
  sed -i '/^synchronous_standby_names/d' "$data/postgresql.auto.conf"
  echo "primary_conninfo = 'host=127.0.0.1 port=$PG_PORT_1 user=postgres application_name=$STANDBY'" >> "$data/postgresql.auto.conf"
  chown "$PG_USER" "$data/postgresql.auto.conf"
  chmod 600 "$data/postgresql.auto.conf"
}

replication_state() { psql_at 1 -c "select state || ' ' || sync_state from pg_stat_replication where application_name = '$STANDBY'" 2>/dev/null || true; }
streaming() { case "$(replication_state)" in streaming*) return 0;; *) return 1;; esac; }

pg_set_sync() {
  local on="$1" want
  [ -z "$(promoted)" ] || die "postgres $(promoted) was promoted and has no standby: synchronous replication needs one (reset)"
  pg_writable 1 || die "postgres 1 is not the primary"
  if [ "$on" = on ]; then
    psql_at 1 -c "ALTER SYSTEM SET synchronous_standby_names = '$STANDBY'" >/dev/null; want=sync
  else
    psql_at 1 -c "ALTER SYSTEM RESET synchronous_standby_names" >/dev/null; want=async
  fi
  psql_at 1 -c 'select pg_reload_conf()' >/dev/null
  if ! streaming; then
    if [ "$want" = sync ]; then log "the standby is not connected: until it is, every commit on the primary waits"
    else log "the standby is not connected; it will stream asynchronously"; fi
    return 0
  fi
  sync_is() { [ "$(replication_state)" = "streaming $1" ]; }
  wait_for 30 0.2 "the standby does not stream as $want (pg_stat_replication: '$(replication_state)'); see $PG_DIR/2/postgres.log" sync_is "$want"
}

start_pg() {
  pg_prepare_dirs
  local p; p="$(promoted)"
  if [ -n "$p" ]; then
    log "postgres $p was promoted; the old primary stays down (reset for a fresh primary + standby)"
    pg_start_server "$p"
    return
  fi
  pg_init_primary
  pg_start_server 1
  psql_at 1 -c \
    "DO \$\$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname='conveyor') THEN CREATE ROLE conveyor LOGIN CREATEDB; END IF; END \$\$;" >/dev/null
  if ! psql_at 1 -c "select 1 from pg_database where datname='conveyor'" | grep -q 1; then
    psql_at 1 -c "CREATE DATABASE conveyor OWNER conveyor" >/dev/null
  fi
  pg_init_standby
  pg_start_server 2
  wait_for "$WAIT" 0.5 "the standby does not stream from postgres 1; see $PG_DIR/2/postgres.log" streaming
  if [ "$PG_SYNC" = 1 ]; then pg_set_sync on; else pg_set_sync off; fi
  log "postgres: primary 1 on $PG_PORT_1, standby 2 on $PG_PORT_2 ($(replication_state))"
}

stop_pg() {
  local i
  for i in 1 2; do
    if pg_running "$i"; then
      log "stopping postgres $i"
      as_pg "$(pg_bin pg_ctl)" -D "$(pg_data "$i")" -m fast -w -t "$WAIT" stop >/dev/null || true
    fi
  done
}

pg_current_primary() {
  local i
  for i in 1 2; do if pg_writable "$i"; then echo "$i"; return 0; fi; done
  return 1
}

# A process counts as gone once it is a zombie: killed children of a killed postmaster wait to be
# reaped by init, which may take a second or more here.
proc_alive() { local st; st="$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)"; [ -n "$st" ] && [ "$st" != Z ]; }
pid_reaped() { ! kill -0 "$1" 2>/dev/null; }
pids_gone() { local p; for p in "$@"; do ! proc_alive "$p" || return 1; done; }

pg_kill_primary() {
  local i pm; local -a children=()
  i="$(pg_current_primary)" || die "no postgres accepts writes"
  pm="$(head -1 "$(pg_data "$i")/postmaster.pid")"
  mapfile -t children < <(pgrep -P "$pm" || true)
  kill -9 "$pm" "${children[@]}"
  wait_for 30 0.1 "postgres $i's processes survived kill -9" pids_gone "$pm" "${children[@]}"
  log "postgres $i (port $(pg_port "$i")) killed: postmaster $pm and ${#children[@]} children"
}

pg_promote() {
  local i t0 other
  t0="$(now)"
  for i in 1 2; do [ "$(pg_role "$i")" = standby ] && break; i=; done
  [ -n "${i:-}" ] || die "no running standby to promote"
  other=$((3 - i))
  if pg_writable "$other"; then log "warning: postgres $other still accepts writes: two primaries now"; fi
  as_pg "$(pg_bin pg_ctl)" -D "$(pg_data "$i")" -w -t "$WAIT" promote >/dev/null \
    || die "pg_ctl promote failed; see $PG_DIR/$i/postgres.log"
  wait_for "$WAIT" 0.1 "postgres $i does not accept writes after promote; see $PG_DIR/$i/postgres.log" pg_writable "$i"
  # Alone now: a synchronous_standby_names would hold every commit.
  psql_at "$i" -c "ALTER SYSTEM RESET synchronous_standby_names" -c 'select pg_reload_conf()' >/dev/null
  echo "$i" > "$PG_DIR/promoted"
  log "postgres $i (port $(pg_port "$i")) promoted; accepts writes after $(since "$t0")s"
}

# ---------------------------------------------------------------------------------------------
# env, status

amqp_urls() {
  local role="$1" n urls=()
  for n in "${NODES[@]}"; do
    urls+=("amqp://conveyor-$role:$(mq_password "$role")@$(node_addr "$n"):$(amqp_port "$n")/%2F")
  done
  (IFS=,; echo "${urls[*]}")
}

print_env() {
  local role n
  for role in dispatcher worker api admin; do
    echo "export CONVEYOR_CLUSTER_AMQP_URLS_${role^^}='$(amqp_urls "$role")'"
  done
  echo "export CONVEYOR_CLUSTER_DATABASE_URL='postgresql://conveyor@127.0.0.1:$PG_PORT_1,127.0.0.1:$PG_PORT_2/conveyor?target_session_attrs=read-write'"
  echo "export CONVEYOR_CLUSTER_PG_ADMIN_URL='postgresql://postgres@127.0.0.1:$PG_PORT_1,127.0.0.1:$PG_PORT_2/postgres?target_session_attrs=read-write'"
  for n in "${NODES[@]}"; do
    echo "export CONVEYOR_CLUSTER_AMQP_HOST_$n='$(node_addr "$n")'"
    echo "export CONVEYOR_CLUSTER_AMQP_PORT_$n='$(amqp_port "$n")'"
  done
  echo "export CONVEYOR_CLUSTER_PG_PORT_1='$PG_PORT_1'"
  echo "export CONVEYOR_CLUSTER_PG_PORT_2='$PG_PORT_2'"
  echo "export CONVEYOR_CLUSTER_SCRIPT='$ROOT/scripts/cluster.sh'"
}

status() {
  local n state view i role extra
  for n in "${NODES[@]}"; do
    extra=""; view=""
    if partitioned "$n"; then extra=" PARTITIONED (its packets are dropped)"; fi
    if ! vm_alive "$n"; then state=stopped
    elif view="$(cluster_view "$n")"; then
      if grep -qx 'app running' <<< "$view"; then state=running; else state="paused (VM up, rabbit stopped)"; fi
      view="$(grep -v '^app' <<< "$view" | sed -E 's/^partitions$/partitions none/; s/^([a-z]+) /\1: /' | paste -sd';' | sed 's/;/; /g')"
    else state="unreachable (VM up, the CLI got no answer)"
    fi
    echo "rabbitmq $n $(node_name "$n") amqp $(node_addr "$n"):$(amqp_port "$n"): $state$extra${view:+ | sees $view}"
  done
  for i in 1 2; do
    role="$(pg_role "$i")"
    if [ "$role" = down ]; then
      if [ -n "$(promoted)" ] && [ "$(promoted)" != "$i" ]; then role="stopped (retired: postgres $(promoted) was promoted)"
      elif pg_running "$i"; then role="running, not answering"; else role=stopped; fi
    fi
    echo "postgres $i 127.0.0.1:$(pg_port "$i"): $role"
  done
  if [ "$(pg_role 1)" = primary ]; then
    role="$(replication_state)"
    echo "replication to $STANDBY: ${role:-not connected} (synchronous_standby_names '$(psql_at 1 -c 'show synchronous_standby_names')')"
  fi
}

with_lock() {
  mkdir -p "$DIR"
  exec 9> "$DIR/.lock"
  flock -w "$WAIT" 9 || die "another scripts/cluster.sh holds $DIR/.lock"
}

usage() {
  echo "usage: $0 start|stop|reset|status|env|await|ctl N ARGS...|node-kill N|node-start N|node-restart N|leader QUEUE [VHOST]|sync-registry|partition N [--wait]|heal N [--no-wait]|pg-kill-primary|pg-promote|pg-primary|pg-sync on|off" >&2
  exit 2
}

[ "$(id -u)" = 0 ] || die "run as root (network namespaces, iptables, runuser)"
cmd="${1:-}"; shift || true
case "$cmd" in
  start)
    with_lock
    t0="$(now)"
    net_up
    require_free_ports
    start_mq
    start_pg
    (umask 077; print_env > "$DIR/env.tmp"); mv "$DIR/env.tmp" "$DIR/env"
    log "ready after $(since "$t0")s: source $DIR/env";;
  stop) with_lock; stop_mq; stop_pg;;
  reset)
    with_lock; stop_mq; stop_pg
    log "wiping $MQ_DIR $PG_DIR $DIR/env"
    rm -rf "$MQ_DIR" "$PG_DIR" "$DIR/env";;
  status) status;;
  env) print_env;;
  await) t0="$(now)"; await_whole; log "whole after $(since "$t0")s";;
  ctl) check_node "${1:-}"; n="$1"; shift; mqctl "$n" "$@";;
  node-kill) check_node "${1:-}"; node_kill "$1";;
  node-start) check_node "${1:-}"; node_start "$1";;
  node-restart)
    check_node "${1:-}"; t0="$(now)"
    log "stopping node $1"; node_stop "$1"; node_start "$1"
    log "node $1 restarted in $(since "$t0")s";;
  leader) [ -n "${1:-}" ] || usage; leader "$1" "${2:-/}";;
  sync-registry) sync_registry;;
  partition)
    check_node "${1:-}"; n="$1"
    ns_exists "$(netns "$n")" || die "node $n's namespace does not exist (start first)"
    drop "$n" on; t0="$(now)"
    log "node $n partitioned: packets on $(netns "$n")-n dropped"
    if [ "${2:-}" = --wait ]; then
      wait_for "$WAIT" 0.5 "the other nodes still see node $n running" seen_down "$n"
      log "the other nodes see node $n down after $(since "$t0")s"
    fi;;
  heal)
    check_node "${1:-}"; n="$1"
    drop "$n" off; t0="$(now)"
    log "node $n healed: packets let through"
    if [ "${2:-}" != --no-wait ]; then await_whole "$n"; log "cluster whole after $(since "$t0")s"; fi;;
  pg-kill-primary) pg_kill_primary;;
  pg-promote) pg_promote;;
  pg-primary)
    i="$(pg_current_primary)" || die "no postgres accepts writes"
    pg_port "$i";;
  pg-sync)
    case "${1:-}" in on|off) pg_set_sync "$1"; log "synchronous replication $1 ($(replication_state))";; *) usage;; esac;;
  *) usage;;
esac
