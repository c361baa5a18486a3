#!/usr/bin/env bash
# A 3-node RabbitMQ cluster on one host for kerwen-peer-bench, plus the quorum queue the client
# uses (3 replicas, one per node; its leader on rabbit1, where it is declared).
#
#   rabbitmq-cluster.sh start    start rabbit1..3@localhost, join them, declare the queue
#   rabbitmq-cluster.sh status   cluster and quorum queue status
#   rabbitmq-cluster.sh stop     stop the nodes (and the epmd this script started), remove the temp dir
#
# Nodes: rabbitN@localhost, AMQP on 127.0.0.1:5672-5674, distribution on 25672-25674 (the
# default AMQP port + 20000). Each node has its own mnesia/log/config under $RABBIT_BENCH_DIR
# (default /tmp/kerwen-rabbit-bench); HOME points there too, so the nodes and the CLI share an
# Erlang cookie of their own and the system's /var/lib/rabbitmq is not touched. Runs the
# scripts in /usr/lib/rabbitmq/bin directly (as the current user; the /usr/sbin wrappers would
# switch to the rabbitmq user).
#
# Configuration (deviations from a stock node, for three nodes sharing one small box):
# - no plugins (management and Prometheus would add stats collection work);
# - vm_memory_high_watermark.absolute = 2GiB per node (the default 40 % of RAM x 3 nodes would
#   exceed the machine).
# Everything else is the default, e.g. RabbitMQ 3.10 already starts the Erlang VM with
# scheduler busy-waiting off (+sbwt none +sbwtdcpu none +sbwtdio none).
#
# fsync policy: quorum queues (Ra) write every entry to the node's shared write-ahead log and
# fsync it (batched) before the entry counts as written; a publisher confirm is sent once a
# quorum of replicas has written (fsynced) the message. That is the default; nothing is tuned.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
DIR=${RABBIT_BENCH_DIR:-/tmp/kerwen-rabbit-bench}
BENCH=${BENCH:-${CARGO_TARGET_DIR:-$HERE/target}/release/kerwen-peer-bench}
RBIN=/usr/lib/rabbitmq/bin
QUEUE=${RABBIT_BENCH_QUEUE:-bench}
URIS=amqp://guest:guest@127.0.0.1:5672/%2f,amqp://guest:guest@127.0.0.1:5673/%2f,amqp://guest:guest@127.0.0.1:5674/%2f

die() { echo "rabbitmq-cluster: $*" >&2; exit 1; }

# Runs a RabbitMQ CLI tool against node N with this cluster's environment.
ctl() {
    local n=$1 tool=$2
    shift 2
    HOME="$DIR" RABBITMQ_CONF_ENV_FILE=/dev/null "$RBIN/$tool" -n "rabbit$n@localhost" "$@"
}

# Pid of a running (not zombie) epmd, if any.
live_epmd() { pgrep -x -r R,S,D epmd | head -1 | grep .; }

start_node() {
    local n=$1 d="$DIR/rabbit$1"
    mkdir -p "$d/mnesia" "$d/log"
    echo "[]." >"$d/enabled_plugins"
    cat >"$d/rabbitmq.conf" <<EOF
listeners.tcp.default = 127.0.0.1:$((5671 + n))
vm_memory_high_watermark.absolute = 2GiB
log.file.level = warning
EOF
    HOME="$DIR" \
        RABBITMQ_CONF_ENV_FILE=/dev/null \
        RABBITMQ_NODENAME="rabbit$n@localhost" \
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT=$((5671 + n)) \
        RABBITMQ_DIST_PORT=$((25671 + n)) \
        RABBITMQ_MNESIA_BASE="$d/mnesia" \
        RABBITMQ_LOG_BASE="$d/log" \
        RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins" \
        RABBITMQ_PID_FILE="$d/pid" \
        nohup "$RBIN/rabbitmq-server" >"$d/stdout.log" 2>&1 &
    echo $! >"$d/launcher.pid"
    # await_startup fails at once while the node is not registered with epmd yet.
    for _ in $(seq 1 120); do
        ctl "$n" rabbitmqctl -q await_startup --timeout 60 >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    die "rabbit$n did not start; see $d/stdout.log and $d/log"
}

start() {
    [ -x "$RBIN/rabbitmq-server" ] || die "RabbitMQ not found in $RBIN (apt-get install rabbitmq-server)"
    [ -x "$BENCH" ] || die "bench client not found at $BENCH (build it: cargo build --release in $HERE, or set BENCH)"
    [ -e "$DIR" ] && die "$DIR exists: already running? ($0 stop)"
    mkdir -p "$DIR"
    head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$DIR/.erlang.cookie"
    chmod 400 "$DIR/.erlang.cookie"
    live_epmd >/dev/null || echo none-before >"$DIR/epmd-owner"

    start_node 1
    if [ -f "$DIR/epmd-owner" ]; then live_epmd >"$DIR/epmd-owner" || true; fi
    for n in 2 3; do
        start_node "$n"
        ctl "$n" rabbitmqctl -q stop_app
        ctl "$n" rabbitmqctl -q join_cluster rabbit1@localhost
        ctl "$n" rabbitmqctl -q start_app
    done
    ctl 1 rabbitmqctl -q cluster_status | grep -A4 -i "running nodes" || true
    "$BENCH" amqp --uris "$URIS" --queue "$QUEUE" --setup-only
    ctl 1 rabbitmq-queues -q quorum_status "$QUEUE" || true
    echo "RabbitMQ $(dpkg-query -W -f '${Version}' rabbitmq-server 2>/dev/null || echo '?') cluster up; state in $DIR"
}

status() {
    [ -d "$DIR" ] || die "not running ($DIR missing)"
    ctl 1 rabbitmqctl -q cluster_status
    ctl 1 rabbitmq-queues -q quorum_status "$QUEUE"
}

stop() {
    [ -d "$DIR" ] || { echo "nothing to stop ($DIR missing)"; return 0; }
    for n in 3 2 1; do
        ctl "$n" rabbitmqctl -q stop >/dev/null 2>&1 || true
    done
    # Whatever did not stop cleanly: the node's Erlang VM (pid file) and its launcher script.
    for n in 1 2 3; do
        for f in "$DIR/rabbit$n/pid" "$DIR/rabbit$n/launcher.pid"; do
            [ -s "$f" ] || continue
            local pid
            pid=$(cat "$f")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
        done
    done
    # epmd is shared by every Erlang node on the host: stop it only if this script started it.
    # Wait for it to exit, so that a start right after this does not mistake it for a running one.
    if [ -s "$DIR/epmd-owner" ] && [ "$(cat "$DIR/epmd-owner")" != none-before ]; then
        local epmd
        epmd=$(cat "$DIR/epmd-owner")
        kill "$epmd" 2>/dev/null || true
        for _ in $(seq 1 30); do live_epmd >/dev/null || break; sleep 0.1; done
    fi
    rm -rf "$DIR"
    echo "RabbitMQ cluster stopped, $DIR removed"
}

case ${1:-} in
start) start ;;
status) status ;;
stop) stop ;;
*) die "usage: $0 start | status | stop" ;;
esac
