#!/usr/bin/env bash
# A throwaway PostgreSQL server for the tests and for local development.
#
#   scripts/postgres.sh start [DIR]    create the cluster (first time) and start it; prints its URL
#   scripts/postgres.sh url [DIR]      print the URL of the cluster in DIR
#   scripts/postgres.sh status [DIR]   exit 0 when it is running
#   scripts/postgres.sh stop [DIR]     stop it (the data stays)
#   scripts/postgres.sh destroy [DIR]  stop it and delete DIR
#
# DIR defaults to $SPATIALBENCH_PG_DIR, else /tmp/spatialbench-postgres. The server listens on
# 127.0.0.1 on a free port (kept in DIR/port), trusts local connections, keeps its socket in
# DIR, and runs with fsync off: it is for tests, never for data you want to keep.
#
# Only the URL goes to stdout, so `export SPATIALBENCH_TEST_DATABASE_URL=$(scripts/postgres.sh
# start)` works. initdb refuses to run as root; as root the cluster belongs to the `postgres`
# user (created if missing) and every server command runs through `runuser -u postgres`.
# Without PostgreSQL binaries, as root with apt-get, it installs postgresql-15 (or postgresql).
set -euo pipefail

cmd=${1:-}
dir=${2:-${SPATIALBENCH_PG_DIR:-/tmp/spatialbench-postgres}}
dbname=${SPATIALBENCH_PG_DATABASE:-spatialbench}

log() { echo "postgres.sh: $*" >&2; }
die() { log "$*"; exit 1; }

find_bindir() {
    local candidate
    for candidate in "${PG_BINDIR:-}" /usr/lib/postgresql/15/bin; do
        if [[ -n $candidate && -x $candidate/initdb && -x $candidate/pg_ctl ]]; then
            echo "$candidate"; return 0
        fi
    done
    for candidate in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [[ -x $candidate/initdb ]]; then echo "$candidate"; return 0; fi
    done
    if command -v pg_config >/dev/null; then
        candidate=$(pg_config --bindir)
        if [[ -x $candidate/initdb && -x $candidate/pg_ctl ]]; then echo "$candidate"; return 0; fi
    fi
    return 1
}

bindir=$(find_bindir || true)
if [[ -z $bindir && $cmd == start ]]; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        log "no PostgreSQL binaries found; installing postgresql-15"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >&2
        apt-get install -y -qq postgresql-15 >&2 || apt-get install -y -qq postgresql >&2
        bindir=$(find_bindir || true)
    fi
fi
[[ -n $bindir || $cmd == destroy ]] || die "no PostgreSQL binaries (initdb, pg_ctl); install postgresql-15 or set PG_BINDIR"

as_owner() {
    if [[ $(id -u) -eq 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

url() {
    echo "postgresql+psycopg://postgres@127.0.0.1:$(cat "$dir/port")/$dbname"
}

running() {
    [[ -f $dir/data/postmaster.pid ]] && as_owner "$bindir/pg_ctl" -D "$dir/data" status >/dev/null 2>&1
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
    if [[ $(id -u) -eq 0 ]]; then
        id postgres >/dev/null 2>&1 || useradd --system --user-group --no-create-home \
            --home-dir /nonexistent --shell /usr/sbin/nologin postgres
    fi
    mkdir -p "$dir"
    chmod 700 "$dir"
    [[ $(id -u) -eq 0 ]] && chown postgres: "$dir"
    as_owner test -w "$dir" || die "$dir is not reachable by the postgres user; use a folder under /tmp"
    if [[ ! -f $dir/data/PG_VERSION ]]; then
        log "initdb $dir/data"
        as_owner "$bindir/initdb" -D "$dir/data" -U postgres --auth=trust --encoding=UTF8 \
            --no-locale >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; die "initdb failed"; }
    fi
    if running; then
        url; return 0
    fi
    local attempt
    for attempt in 1 2 3; do
        # A restarted cluster keeps its port (clients reconnect to the same URL), unless
        # that port was taken meanwhile.
        if [[ $attempt -gt 1 || ! -s $dir/port ]]; then
            free_port >"$dir/port"
        fi
        if as_owner "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
            -o "-p $(cat "$dir/port") -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
            start >&2; then
            break
        fi
        # Another process may have taken the port between choosing and binding it.
        [[ $attempt -eq 3 ]] && { tail -n 20 "$dir/server.log" >&2; die "the server did not start"; }
    done
    local port; port=$(cat "$dir/port")
    if ! as_owner "$bindir/psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = '$dbname'" | grep -q 1; then
        as_owner "$bindir/createdb" -h 127.0.0.1 -p "$port" -U postgres "$dbname"
    fi
    url
}

case $cmd in
    start) start ;;
    url) [[ -f $dir/port ]] || die "no cluster in $dir"; url ;;
    status) running ;;
    stop)
        if running; then as_owner "$bindir/pg_ctl" -D "$dir/data" -m fast -w stop >&2; fi ;;
    destroy)
        if [[ -n $bindir ]] && running; then as_owner "$bindir/pg_ctl" -D "$dir/data" -m immediate -w stop >&2; fi
        rm -rf "$dir" ;;
    *) die "usage: $0 start|url|status|stop|destroy [DIR]" ;;
esac
