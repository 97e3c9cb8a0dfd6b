#!/usr/bin/env bash
# A real, throwaway PostgreSQL server for the tests: its own cluster in $CLAWLY_PG_DIR, listening
# on 127.0.0.1:$CLAWLY_PG_PORT only (plus a unix socket in that dir), a role and database `clawly`.
#
#   postgres.sh install   apt-get install postgresql when no initdb is found (Debian puts it in
#                         /usr/lib/postgresql/<major>/bin, not on PATH)
#   postgres.sh start     initdb + start (idempotent: a running server is left as it is);
#                         prints the SQLAlchemy URL on stdout, everything else goes to stderr
#   postgres.sh url       prints the URL of the running server
#   postgres.sh stop      pg_ctl stop and remove the dir (idempotent)
#
# Meant to run as root (CI, the dev machine): the server then runs as user `postgres` (initdb and
# postgres refuse root). Run as another user, it runs as that user.
# Environment: CLAWLY_PG_DIR (/tmp/clawly-pg), CLAWLY_PG_PORT (55432), CLAWLY_PG_PASSWORD (clawly).
set -euo pipefail

DIR=${CLAWLY_PG_DIR:-/tmp/clawly-pg}
PORT=${CLAWLY_PG_PORT:-55432}
PASSWORD=${CLAWLY_PG_PASSWORD:-clawly}
DATA=$DIR/data
LOG=$DIR/postgres.log

log() { echo "postgres.sh: $*" >&2; }
die() { log "ERROR: $*"; [[ -f $LOG ]] && { log "last lines of $LOG:"; tail -n 30 "$LOG" >&2; }; exit 1; }

pg_bin() {  # newest installed major version
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -n $d && -x $d/initdb ]]; then echo "$d"; return; fi
    d=$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/initdb)")
    [[ -x $d/initdb ]] && { echo "$d"; return; }
    return 1
}

if [[ $(id -u) == 0 ]]; then
    SVC_USER=postgres
    as_pg() { runuser -u postgres -- "$@"; }
else
    SVC_USER=$(id -un)
    as_pg() { "$@"; }
fi

url() { echo "postgresql+psycopg://clawly:${PASSWORD}@127.0.0.1:$(cat "$DIR/port")/clawly"; }

running() { [[ -f $DIR/port && -d $DATA ]] && as_pg "$BIN/pg_ctl" status -D "$DATA" >/dev/null 2>&1; }

port_busy() {  # something already accepts connections on 127.0.0.1:$1
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

cmd_install() {
    if pg_bin >/dev/null; then
        log "PostgreSQL already installed: $("$(pg_bin)/postgres" --version)"
        return
    fi
    apt-get update -q
    # postinst creates and tries to start a default cluster on 5432; in a container without
    # systemd policy-rc.d refuses the start, and this script never uses that cluster.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql >&2
    pg_bin >/dev/null || die "initdb still not found after apt-get install postgresql"
    log "installed: $("$(pg_bin)/postgres" --version)"
}

cmd_start() {
    if running; then log "already running in $DIR"; url; return; fi
    # a dir left by a killed run (stale postmaster.pid, half-done initdb): start over
    if [[ -e $DIR ]]; then
        log "removing stale $DIR"
        [[ -d $DATA ]] && as_pg "$BIN/pg_ctl" stop -D "$DATA" -m immediate >/dev/null 2>&1 || true
        rm -rf "$DIR"
    fi
    port_busy "$PORT" && die "127.0.0.1:$PORT is already in use (set CLAWLY_PG_PORT to a free port)"
    mkdir -p "$DIR"
    chown "$SVC_USER" "$DIR"
    chmod 700 "$DIR"
    as_pg test -w "$DIR" || die "user $SVC_USER cannot write $DIR (is a parent dir closed to it? set CLAWLY_PG_DIR under /tmp)"
    echo "$PORT" >"$DIR/port"
    local pwfile=$DIR/pw
    printf '%s\n' "$PASSWORD" >"$pwfile"; chown "$SVC_USER" "$pwfile"; chmod 600 "$pwfile"
    # local (unix socket) is trusted for the admin steps below; TCP needs the password
    as_pg "$BIN/initdb" -D "$DATA" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
        -E UTF8 --locale=C.UTF-8 >"$DIR/initdb.log" 2>&1 || { cat "$DIR/initdb.log" >&2; die "initdb failed"; }
    cat >>"$DATA/postgresql.conf" <<EOF

# clawly test server (.ci/services/postgres.sh)
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$DIR'
max_connections = 100
# a throwaway server: durability buys nothing here and costs test time
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
    as_pg "$BIN/pg_ctl" start -D "$DATA" -l "$LOG" -w -t 60 >/dev/null || die "pg_ctl start failed"
    as_pg "$BIN/psql" -h "$DIR" -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -q >/dev/null <<EOF || die "creating role/database failed"
CREATE ROLE clawly LOGIN PASSWORD '$(sed "s/'/''/g" "$pwfile")';
CREATE DATABASE clawly OWNER clawly;
EOF
    rm -f "$pwfile"
    log "started $("$BIN/postgres" --version) on 127.0.0.1:$PORT, data in $DATA"
    url
}

cmd_stop() {
    if [[ -d $DATA ]]; then
        as_pg "$BIN/pg_ctl" stop -D "$DATA" -m fast -w -t 30 >/dev/null 2>&1 \
            || as_pg "$BIN/pg_ctl" stop -D "$DATA" -m immediate -w -t 30 >/dev/null 2>&1 || true
    fi
    rm -rf "$DIR"
    log "stopped; removed $DIR"
}

case ${1:-} in
    install) cmd_install ;;
    start) BIN=$(pg_bin) || die "PostgreSQL is not installed (run: $0 install)"; cmd_start ;;
    stop) BIN=$(pg_bin) || { rm -rf "$DIR"; exit 0; }; cmd_stop ;;
    url) BIN=$(pg_bin) || die "PostgreSQL is not installed"; running || die "not running in $DIR"; url ;;
    *) echo "usage: $0 {install|start|stop|url}" >&2; exit 2 ;;
esac
