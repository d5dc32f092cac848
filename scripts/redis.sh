#!/usr/bin/env bash
# A throwaway Redis server for the tests and local runs.
#
#   redis.sh start     start it (or find it running); prints its URL
#   redis.sh stop      stop it (the port, and the data when persistent, stay in $REDIS_DIR)
#   redis.sh url       print its URL while it runs
#   redis.sh destroy   stop it and delete $REDIS_DIR
#
# It lives in $REDIS_DIR (default /tmp/spatialbench-redis-$UID) and listens on a loopback port
# chosen once and kept in $REDIS_DIR/port, so `stop; start` brings it back at the same URL and
# clients reconnect (a new port only if another process took that one meanwhile). By default it
# keeps nothing on disk; REDIS_PERSIST=1 at the first start turns on the append-only file
# (fsync every second) in $REDIS_DIR, remembered for later starts, so queued messages survive
# a restart. redis-server is installed with apt-get when missing (the package lists are
# refreshed only if the first try fails).
set -euo pipefail

DIR=${REDIS_DIR:-/tmp/spatialbench-redis-$(id -u)}
PIDFILE="$DIR/redis.pid"
URLFILE="$DIR/url"
PORTFILE="$DIR/port"
PERSISTFILE="$DIR/persist"

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

port_free() {
    python3 - "$1" <<'PY'
import socket, sys
with socket.socket() as s:
    # As Redis binds: a port whose old connections linger in TIME_WAIT is free.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", int(sys.argv[1])))
    except OSError:
        sys.exit(1)
PY
}

persistence() {
    if [ "${REDIS_PERSIST:-0}" = 1 ] || [ -f "$PERSISTFILE" ]; then
        touch "$PERSISTFILE"
        echo --appendonly yes --appendfsync everysec --appendfilename spatialbench.aof
    else
        echo --appendonly no
    fi
}

start() {
    if running && [ -f "$URLFILE" ]; then
        cat "$URLFILE"
        return 0
    fi
    install_redis
    mkdir -p "$DIR"
    # The kept port, unless another process took it meanwhile.
    if [ ! -s "$PORTFILE" ] || ! port_free "$(cat "$PORTFILE")"; then
        free_port >"$PORTFILE"
    fi
    local port
    port=$(cat "$PORTFILE")
    # shellcheck disable=SC2046  # the options are separate words
    redis-server --port "$port" --bind 127.0.0.1 --daemonize yes \
        --pidfile "$PIDFILE" --dir "$DIR" --logfile "$DIR/redis.log" \
        --save "" $(persistence) >/dev/null
    for _ in $(seq 1 100); do
        if redis-cli -p "$port" ping 2>/dev/null | grep -q PONG; then
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
        # SIGTERM: Redis flushes the append-only file before it exits.
        kill "$pid"
        for _ in $(seq 1 100); do
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
    destroy) stop; rm -rf "$DIR" ;;
    *) echo "usage: $0 start|stop|url|destroy" >&2; exit 2 ;;
esac
