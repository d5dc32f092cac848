#!/usr/bin/env bash
# A throwaway Redis server for the tests and local runs: `redis.sh start` prints its URL,
# `redis.sh stop` stops it. It listens on a free loopback port, keeps nothing on disk, and lives
# in $REDIS_DIR (default /tmp/spatialbench-redis-$UID). redis-server is installed with apt-get
# when missing (the package lists are refreshed only if the first try fails).
set -euo pipefail

DIR=${REDIS_DIR:-/tmp/spatialbench-redis-$(id -u)}
PIDFILE="$DIR/redis.pid"
URLFILE="$DIR/url"

install_redis() {
    command -v redis-server >/dev/null 2>&1 && return 0
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    if ! $sudo apt-get install -y -qq redis-server >/dev/null 2>&1; then
        $sudo apt-get update -qq >/dev/null
        $sudo apt-get install -y -qq redis-server >/dev/null
    fi
    # The package may start a system service on 6379; we run our own, so leave it alone.
    command -v redis-server >/dev/null 2>&1
}

running() {
    [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null
}

free_port() {
    python3 - <<'PY'
import socket
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
PY
}

start() {
    if running && [ -f "$URLFILE" ]; then
        cat "$URLFILE"
        return 0
    fi
    install_redis
    mkdir -p "$DIR"
    local port
    port=$(free_port)
    redis-server --port "$port" --bind 127.0.0.1 --daemonize yes \
        --pidfile "$PIDFILE" --dir "$DIR" --logfile "$DIR/redis.log" \
        --save "" --appendonly no >/dev/null
    for _ in $(seq 1 100); do
        if redis-cli -p "$port" ping >/dev/null 2>&1; then
            echo "redis://127.0.0.1:$port/0" | tee "$URLFILE"
            return 0
        fi
        sleep 0.1
    done
    echo "redis-server did not answer on port $port; see $DIR/redis.log" >&2
    return 1
}

stop() {
    if running; then
        local pid
        pid=$(cat "$PIDFILE")
        kill "$pid"
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
    fi
    rm -f "$PIDFILE" "$URLFILE"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    url) running && cat "$URLFILE" ;;
    *) echo "usage: $0 start|stop|url" >&2; exit 2 ;;
esac
