#!/usr/bin/env bash
# Three-node RabbitMQ cluster for failover tests, started from the machine's own RabbitMQ
# installation BESIDE the machine's broker (127.0.0.1:5672, node rabbit@localhost), which this
# script never touches: the nodes have their own names, ports, config, data, logs and cookie.
#
#   scripts/rabbitmq-cluster.sh up           start + cluster the nodes (idempotent); prints URLs
#   scripts/rabbitmq-cluster.sh down         stop the nodes, remove CLUSTER_DIR
#   scripts/rabbitmq-cluster.sh urls         print the AMQP URLs, comma-separated
#   scripts/rabbitmq-cluster.sh status       one line per node "NAME PORT running|down", then cluster_status
#   scripts/rabbitmq-cluster.sh kill NODE    kill -9 the node's Erlang VM, wait until it is gone
#   scripts/rabbitmq-cluster.sh start NODE   start a killed/stopped node, wait until it runs again
#   scripts/rabbitmq-cluster.sh leader QUEUE print "NODE PORT" of the quorum queue's leader
#   scripts/rabbitmq-cluster.sh ctl NODE ARGS...   run rabbitmqctl against NODE (right cookie)
#
# NODE is 1|2|3, a node name (vmc2 or vmc2@localhost) or its AMQP port (5702).
# Machine-readable output goes to stdout, progress to stderr.
#
# Environment (read by `up`; later commands use what `up` recorded in CLUSTER_DIR/cluster.env):
#   CLUSTER_DIR            base directory                        (/tmp/verimail-cluster)
#   CLUSTER_PORT_BASE      node i serves AMQP on base+i          (5700 -> 5701 5702 5703)
#   CLUSTER_DIST_PORT_BASE node i's Erlang distribution port     (25700 -> 25701 25702 25703)
#   CLUSTER_NODE_PREFIX    node i is PREFIXi@localhost           (vmc)
#   CLUSTER_TIMEOUT        seconds to wait for a node to run     (90)
#   CLUSTER_JOIN           ctl: each node boots alone, then 2 and 3 join 1 one at a time
#                          (rabbitmqctl stop_app, join_cluster, start_app): cannot race;
#                          boot: 2 and 3 join 1 while booting (peer discovery, ~10 s faster,
#                          but a node can die with table_attributes_mismatch when it syncs
#                          from a peer still creating its schema)                    (ctl)
#   RABBITMQ_BIN_DIR       RabbitMQ's own scripts                (/usr/lib/rabbitmq/bin)
set -euo pipefail

NODES=(1 2 3)
CLUSTER_DIR=${CLUSTER_DIR:-/tmp/verimail-cluster}
CLUSTER_DIR=${CLUSTER_DIR%/}
STATE_FILE=$CLUSTER_DIR/cluster.env
LOCK_FILE=$CLUSTER_DIR.lock
PORT_BASE=${CLUSTER_PORT_BASE:-5700}
DIST_PORT_BASE=${CLUSTER_DIST_PORT_BASE:-25700}
PREFIX=${CLUSTER_NODE_PREFIX:-vmc}
TIMEOUT=${CLUSTER_TIMEOUT:-90}
JOIN=${CLUSTER_JOIN:-ctl}
RMQ_BIN=${RABBITMQ_BIN_DIR:-/usr/lib/rabbitmq/bin}
# The nodes and every CLI call run with this host part; the machine's broker also uses
# "localhost", and its shared epmd (127.0.0.1:4369) resolves it.
HOST_PART=localhost

# A running cluster keeps the settings it was started with, whatever the caller's env says.
if [[ -f $STATE_FILE ]]; then
  # shellcheck source=/dev/null
  . "$STATE_FILE"
fi

log() { echo "rabbitmq-cluster: $*" >&2; }
die() {
  log "$*"
  exit 1
}

now_ms() { date +%s%3N; }

# Nodes run as the `rabbitmq` user when we are root (as the machine's broker does), else as us.
if [[ $(id -u) == 0 ]] && id rabbitmq >/dev/null 2>&1; then
  RUN_USER=rabbitmq
else
  RUN_USER=$(id -un)
fi

node_name() { echo "$PREFIX$1@$HOST_PART"; }
node_port() { echo $((PORT_BASE + $1)); }
node_dist_port() { echo $((DIST_PORT_BASE + $1)); }
node_dir() { echo "$CLUSTER_DIR/$PREFIX$1"; }
node_url() { echo "amqp://guest:guest@127.0.0.1:$(node_port "$1")/%2f"; }

urls() {
  local out="" i
  for i in "${NODES[@]}"; do
    out+="${out:+,}$(node_url "$i")"
  done
  echo "$out"
}

# Maps 1 | vmc1 | vmc1@localhost | 5701 to the node's index.
resolve_node() {
  local arg=$1 i
  for i in "${NODES[@]}"; do
    if [[ $arg == "$i" || $arg == "$PREFIX$i" || $arg == "$(node_name "$i")" ||
      $arg == "$(node_port "$i")" ]]; then
      echo "$i"
      return 0
    fi
  done
  die "unknown node '$arg' (use 1-3, $(node_name 1), or $(node_port 1))"
}

# Runs a command as RUN_USER with a clean environment: RabbitMQ reads many unprefixed variables
# (NODENAME, CONFIG_FILE, LOG_BASE, ...) as fallbacks, so nothing of the caller's env may leak in.
# HOME holds the cluster's private Erlang cookie.
as_node_user() {
  local env_file=$1
  shift
  local cmd=(env -i "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    "HOME=$CLUSTER_DIR/home" "LANG=C.UTF-8" "LC_ALL=C.UTF-8"
    "RABBITMQ_CONF_ENV_FILE=$env_file" sh -c ". \"\$RABBITMQ_CONF_ENV_FILE\" && exec \"\$@\"" sh "$@")
  # 9>&-: the lock's fd must not leak into the daemonized VM (or an epmd it spawns), or the
  # lock would stay held until the node dies.
  if [[ $RUN_USER != "$(id -un)" ]]; then
    (cd "$CLUSTER_DIR" && runuser -u "$RUN_USER" -- "${cmd[@]}" 9>&-)
  else
    (cd "$CLUSTER_DIR" && "${cmd[@]}" 9>&-)
  fi
}

# rabbitmq CLI tool against node i: cli i rabbitmqctl ARGS...
cli() {
  local i=$1 tool=$2
  shift 2
  as_node_user "$(node_dir "$i")/rabbitmq-env.conf" "$RMQ_BIN/$tool" -n "$(node_name "$i")" "$@"
}

pid_of() {
  local pid_file
  pid_file=$(node_dir "$1")/$PREFIX$1.pid
  [[ -s $pid_file ]] || return 1
  local pid
  pid=$(tr -dc '0-9' <"$pid_file")
  [[ -n $pid ]] && alive "$pid" || return 1
  # Pid files outlive kill -9: make sure the pid is still an Erlang VM, not a recycled pid.
  [[ $(cat "/proc/$pid/comm" 2>/dev/null) == beam* ]] || return 1
  echo "$pid"
}

# The pid listening on the node's distribution port: finds a node whose pid file is gone
# (for example, CLUSTER_DIR removed under a running cluster).
pid_by_port() {
  ss -Hltnp "sport = :$(node_dist_port "$1")" 2>/dev/null |
    grep -o 'beam[^"]*",pid=[0-9]*' | head -n1 | grep -o '[0-9]*$' || true
}

# kill -0 also succeeds on a zombie: a container whose PID 1 does not reap would keep a killed,
# daemonized VM "alive" forever.
alive() {
  kill -0 "$1" 2>/dev/null || return 1
  [[ $(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null) != Z ]]
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

is_running() { cli "$1" rabbitmq-diagnostics -q check_running >/dev/null 2>&1; }

# Waits until the node runs. Polls check_running (not await_startup: it fails while the node is
# not registered yet), but only once the AMQP port is open: every CLI call boots an Erlang VM
# (about a CPU second), and three pollers would slow the three booting nodes down.
wait_running() {
  local i=$1 start port
  start=$(date +%s)
  port=$(node_port "$i")
  while :; do
    if port_open "$port" && is_running "$i"; then
      return 0
    fi
    # The pid file and the distribution listener appear a few seconds into the boot; after
    # that, a missing VM means it died (bad config, taken port): fail now, not at the deadline.
    if [[ $(($(date +%s) - start)) -ge 20 ]] && ! pid_of "$i" >/dev/null &&
      [[ -z $(pid_by_port "$i") ]]; then
      log "$(node_name "$i") is not running (died while booting?); log: $(node_dir "$i")/log"
      tail -n 20 "$(node_dir "$i")/log/$(node_name "$i").log" >&2 2>/dev/null || true
      return 1
    fi
    if [[ $(($(date +%s) - start)) -ge $TIMEOUT ]]; then
      log "$(node_name "$i") not running after ${TIMEOUT}s; log: $(node_dir "$i")/log"
      return 1
    fi
    sleep 0.2
  done
}

write_files() {
  local i=$1 d
  d=$(node_dir "$i")
  mkdir -p "$d/mnesia" "$d/log"
  cat >"$d/rabbitmq.conf" <<EOF
listeners.tcp.local = 127.0.0.1:$(node_port "$i")
loopback_users.guest = true
log.console = false
log.file.level = info
EOF
  if [[ $JOIN == boot && $i != 1 ]]; then
    # Nodes 2 and 3 join node 1 while they boot (saves the stop_app/join_cluster/start_app
    # round, about 10 s): peer discovery lists node 1 only, so there is exactly one seed and no
    # chance of two clusters, and it retries while node 1 is still booting. Only a blank node
    # runs peer discovery; a restarted member just rejoins.
    cat >>"$d/rabbitmq.conf" <<EOF
cluster_formation.peer_discovery_backend = classic_config
cluster_formation.classic_config.nodes.1 = $(node_name 1)
cluster_formation.discovery_retry_limit = $((TIMEOUT * 2))
cluster_formation.discovery_retry_interval = 500
EOF
  fi
  # One file serves rabbitmq-env (RABBITMQ_CONF_ENV_FILE, so the machine's
  # /etc/rabbitmq/rabbitmq-env.conf with NODENAME=rabbit@localhost is NOT read) and our own
  # `sh -c . file` wrapper, so the variables are set both ways.
  cat >"$d/rabbitmq-env.conf" <<EOF
export RABBITMQ_NODENAME=$(node_name "$i")
export RABBITMQ_USE_LONGNAME=false
export RABBITMQ_DIST_PORT=$(node_dist_port "$i")
export RABBITMQ_CONFIG_FILE=$d/rabbitmq.conf
export RABBITMQ_ADVANCED_CONFIG_FILE=$d/advanced.config
export RABBITMQ_ENABLED_PLUGINS_FILE=$CLUSTER_DIR/enabled_plugins
export RABBITMQ_MNESIA_BASE=$d/mnesia
export RABBITMQ_MNESIA_DIR=$d/mnesia/$(node_name "$i")
export RABBITMQ_LOG_BASE=$d/log
export RABBITMQ_PID_FILE=$d/$PREFIX$i.pid
export ERL_EPMD_ADDRESS=127.0.0.1
# The CLI's own distribution ports: not the 35672-35682 the machine's rabbitmqctl uses.
export RABBITMQ_CTL_DIST_PORT_MIN=$((DIST_PORT_BASE + 100))
export RABBITMQ_CTL_DIST_PORT_MAX=$((DIST_PORT_BASE + 130))
export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"
EOF
}

prepare_dir() {
  mkdir -p "$CLUSTER_DIR/home"
  chmod 755 "$CLUSTER_DIR"
  # No plugins: the nodes boot in a few seconds.
  echo '[].' >"$CLUSTER_DIR/enabled_plugins"
  if [[ ! -s $CLUSTER_DIR/home/.erlang.cookie ]]; then
    # A private cookie: nothing here can talk to (or join) the machine's rabbit@localhost.
    head -c 32 /dev/urandom | od -An -tx1 | tr -dc 'a-f0-9' | tr 'a-f' 'A-F' >"$CLUSTER_DIR/home/.erlang.cookie"
  fi
  chmod 400 "$CLUSTER_DIR/home/.erlang.cookie"
  local i
  for i in "${NODES[@]}"; do write_files "$i"; done
  cat >"$STATE_FILE" <<EOF
PORT_BASE=$PORT_BASE
DIST_PORT_BASE=$DIST_PORT_BASE
PREFIX=$PREFIX
TIMEOUT=$TIMEOUT
JOIN=$JOIN
RMQ_BIN=$RMQ_BIN
EOF
  chown -R "$RUN_USER:" "$CLUSTER_DIR"
}

check_ports_free() {
  local i=$1 epmd
  if port_open "$(node_port "$i")" || port_open "$(node_dist_port "$i")"; then
    die "port $(node_port "$i") or $(node_dist_port "$i") is taken by another process (set CLUSTER_PORT_BASE / CLUSTER_DIST_PORT_BASE)"
  fi
  # Node names are machine-wide (one epmd): a second cluster needs its own CLUSTER_NODE_PREFIX.
  epmd=$(command -v epmd || find /usr/lib/erlang -name epmd -type f 2>/dev/null | head -n1 || true)
  [[ -n $epmd ]] || return 0
  local _
  # epmd forgets a killed node a moment after its socket closes.
  for _ in $(seq 20); do
    "$epmd" -names 2>/dev/null | grep -q "^name $PREFIX$i at port" || return 0
    sleep 0.1
  done
  die "node name $(node_name "$i") is taken by another Erlang node (set CLUSTER_NODE_PREFIX)"
}

launch() {
  local i=$1 d
  d=$(node_dir "$i")
  if pid_of "$i" >/dev/null; then return 0; fi
  check_ports_free "$i"
  # -detached: the VM daemonizes and the launcher returns at once; the pid file appears
  # during boot.
  as_node_user "$d/rabbitmq-env.conf" "$RMQ_BIN/rabbitmq-server" -detached \
    >>"$d/log/launcher.log" 2>&1
}

# Joins the given nodes to node 1: stop_app (in parallel), join_cluster (one at a time: two
# concurrent schema changes on node 1 are asking for trouble), start_app (in parallel).
join() {
  local i pids=()
  for i in "$@"; do
    cli "$i" rabbitmqctl -q stop_app >&2 &
    pids+=($!)
  done
  for i in "${pids[@]}"; do wait "$i"; done
  for i in "$@"; do
    cli "$i" rabbitmqctl -q join_cluster "$(node_name 1)" >&2
  done
  pids=()
  for i in "$@"; do
    cli "$i" rabbitmqctl -q start_app >&2 &
    pids+=($!)
  done
  for i in "${pids[@]}"; do wait "$i"; done
}

# True when node i sees all three nodes running in its cluster (one CLI call).
cluster_complete() {
  local out j
  out=$(cli "$1" rabbitmqctl -q cluster_status --formatter json 2>/dev/null |
    grep -o '"running_nodes":\[[^]]*\]') || return 1
  for j in "${NODES[@]}"; do
    [[ $out == *"\"$(node_name "$j")\""* ]] || return 1
  done
}

all_running() {
  local i pids=() ok=0
  for i in "${NODES[@]}"; do
    is_running "$i" &
    pids+=($!)
  done
  for i in "${pids[@]}"; do wait "$i" || ok=1; done
  return $ok
}

cmd_up() {
  local t0 i
  t0=$(now_ms)
  if [[ -f $STATE_FILE ]] && all_running; then
    log "already up ($(node_name 1), $(node_name 2), $(node_name 3))"
    urls
    return 0
  fi
  local any=0
  for i in "${NODES[@]}"; do pid_of "$i" >/dev/null && any=1; done
  if [[ $any == 1 && -f $STATE_FILE && -f $CLUSTER_DIR/clustered ]]; then
    # Part of a formed cluster is down (a test killed a node): restart the missing ones.
    local pids=()
    for i in "${NODES[@]}"; do
      if ! pid_of "$i" >/dev/null; then
        cmd_start "$i" &
        pids+=($!)
      fi
    done
    for i in "${pids[@]}"; do wait "$i" || die "a node did not restart; see $CLUSTER_DIR/*/log"; done
    urls
    return 0
  fi
  # Nothing usable: start from scratch (stale nodes of a removed/broken dir are stopped first).
  stop_all
  rm -rf "$CLUSTER_DIR"
  # A fresh cluster takes its settings from the caller's env, not from the removed state file.
  PORT_BASE=${CLUSTER_PORT_BASE:-5700}
  DIST_PORT_BASE=${CLUSTER_DIST_PORT_BASE:-25700}
  PREFIX=${CLUSTER_NODE_PREFIX:-vmc}
  TIMEOUT=${CLUSTER_TIMEOUT:-90}
  JOIN=${CLUSTER_JOIN:-ctl}
  RMQ_BIN=${RABBITMQ_BIN_DIR:-/usr/lib/rabbitmq/bin}
  for i in "${NODES[@]}"; do check_ports_free "$i"; done
  prepare_dir
  for i in "${NODES[@]}"; do launch "$i"; done
  log "launched $(node_name 1) $(node_name 2) $(node_name 3); waiting for them to run"
  local pids=()
  for i in "${NODES[@]}"; do
    wait_running "$i" &
    pids+=($!)
  done
  for i in "${pids[@]}"; do wait "$i" || die "a node did not start; see $CLUSTER_DIR/*/log"; done
  log "3 nodes running after $(($(now_ms) - t0)) ms"
  if ! cluster_complete 1; then
    # CLUSTER_JOIN=ctl, or a node gave up on peer discovery and started alone.
    local to_join=()
    for i in 2 3; do
      cli "$i" rabbitmqctl -q cluster_status 2>/dev/null | grep -q "$(node_name 1)" ||
        to_join+=("$i")
    done
    if [[ ${#to_join[@]} -gt 0 ]]; then
      log "joining ${to_join[*]} to $(node_name 1) (stop_app, join_cluster, start_app)"
      join "${to_join[@]}"
      log "joined after $(($(now_ms) - t0)) ms"
    fi
    cluster_complete 1 || die "the nodes did not form one cluster; see $CLUSTER_DIR/*/log"
  fi
  touch "$CLUSTER_DIR/clustered"
  log "cluster up after $(($(now_ms) - t0)) ms"
  urls
}

stop_all() {
  local i pid pids=()
  for i in "${NODES[@]}"; do
    pid=$(pid_of "$i" || pid_by_port "$i")
    [[ -n $pid ]] && pids+=("$pid")
  done
  [[ ${#pids[@]} == 0 ]] && return 0
  # The data is thrown away anyway: no graceful shutdown (it takes seconds per node).
  kill -KILL "${pids[@]}" 2>/dev/null || true
  local deadline=$(($(date +%s) + 10)) left
  while :; do
    left=()
    for pid in "${pids[@]}"; do alive "$pid" && left+=("$pid"); done
    [[ ${#left[@]} == 0 ]] && return 0
    [[ $(date +%s) -lt $deadline ]] || die "could not kill ${left[*]}"
    sleep 0.05
  done
}

cmd_down() {
  local t0
  t0=$(now_ms)
  stop_all
  rm -rf "$CLUSTER_DIR"
  log "down after $(($(now_ms) - t0)) ms"
}

cmd_kill() {
  local i=$1 pid
  pid=$(pid_of "$i" || pid_by_port "$i")
  [[ -n $pid ]] || die "$(node_name "$i") is not running"
  kill -KILL "$pid"
  while alive "$pid"; do sleep 0.05; done
  log "killed $(node_name "$i") (pid $pid, port $(node_port "$i"))"
}

cmd_start() {
  local i=$1 t0
  t0=$(now_ms)
  [[ -f $STATE_FILE ]] || die "cluster is not up (run: $0 up)"
  if pid_of "$i" >/dev/null && is_running "$i"; then
    log "$(node_name "$i") already running"
    return 0
  fi
  launch "$i"
  wait_running "$i"
  # A restarted member syncs with the running members before its app starts; check it sees them.
  local j others=()
  for j in "${NODES[@]}"; do
    [[ $j != "$i" ]] && pid_of "$j" >/dev/null && others+=("$(node_name "$j")")
  done
  if [[ ${#others[@]} -gt 0 ]]; then
    local out
    out=$(cli "$i" rabbitmqctl -q cluster_status --formatter json | grep -o '"running_nodes":\[[^]]*\]') ||
      die "$(node_name "$i") runs but cluster_status failed"
    [[ $out == *"\"${others[0]}\""* ]] || die "$(node_name "$i") runs but did not rejoin: $out"
  fi
  log "$(node_name "$i") running again after $(($(now_ms) - t0)) ms"
}

cmd_status() {
  local i first="" state=()
  if [[ ! -f $STATE_FILE ]]; then
    log "cluster is not up"
    for i in "${NODES[@]}"; do echo "$(node_name "$i") $(node_port "$i") down"; done
    return 3
  fi
  # One CLI call costs about a second: ask the three nodes at once.
  for i in "${NODES[@]}"; do
    is_running "$i" &
    state[i]=$!
  done
  for i in "${NODES[@]}"; do
    if wait "${state[i]}"; then
      echo "$(node_name "$i") $(node_port "$i") running"
      [[ -n $first ]] || first=$i
    else
      echo "$(node_name "$i") $(node_port "$i") down"
    fi
  done
  [[ -n $first ]] || return 3
  # Without the terminal escapes the CLI prints even into pipes.
  cli "$first" rabbitmqctl -q cluster_status | sed 's/\x1b\[[0-9;]*m//g'
}

cmd_leader() {
  local queue=$1 vhost=${2:-/} i out leader
  [[ -f $STATE_FILE ]] || die "cluster is not up"
  for i in "${NODES[@]}"; do
    pid_of "$i" >/dev/null || continue
    # Tab-separated "name<TAB>leader" lines; any live node answers for the whole cluster.
    out=$(cli "$i" rabbitmqctl -q list_queues -p "$vhost" --no-table-headers name type leader 2>/dev/null) || continue
    leader=$(awk -F'\t' -v q="$queue" '$1 == q { print $3; exit }' <<<"$out")
    if [[ -z $leader ]]; then
      if awk -F'\t' -v q="$queue" '$1 == q { f = 1 } END { exit !f }' <<<"$out"; then
        die "queue '$queue' has no leader (not a quorum queue, or election in progress)"
      fi
      die "no queue '$queue' in vhost '$vhost'"
    fi
    local j
    for j in "${NODES[@]}"; do
      if [[ $leader == "$(node_name "$j")" ]]; then
        echo "$leader $(node_port "$j")"
        return 0
      fi
    done
    die "leader '$leader' is not one of the cluster's nodes"
  done
  die "no node answered"
}

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 2
}

# Serializes commands that change the cluster: tests running in parallel may all call `up`.
with_lock() {
  exec 9>"$LOCK_FILE"
  flock -w $((TIMEOUT * 2)) 9 || die "could not lock $LOCK_FILE"
  "$@"
}

[[ -x $RMQ_BIN/rabbitmq-server ]] || die "RabbitMQ not found in $RMQ_BIN (apt-get install rabbitmq-server)"

case ${1:-} in
up) with_lock cmd_up ;;
down) with_lock cmd_down ;;
urls) urls ;;
status) cmd_status ;;
kill)
  [[ $# == 2 ]] || usage
  n=$(resolve_node "$2")
  with_lock cmd_kill "$n"
  ;;
start)
  [[ $# == 2 ]] || usage
  n=$(resolve_node "$2")
  with_lock cmd_start "$n"
  ;;
leader)
  [[ $# == 2 || $# == 3 ]] || usage
  cmd_leader "$2" "${3:-/}"
  ;;
ctl)
  [[ $# -ge 2 ]] || usage
  n=$(resolve_node "$2")
  shift 2
  cli "$n" rabbitmqctl "$@"
  ;;
*) usage ;;
esac
