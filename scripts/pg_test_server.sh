#!/usr/bin/env bash
# A private PostgreSQL server for tests and benchmarks, all inside DIR:
#
#   scripts/pg_test_server.sh start DIR [OWNER_PID]   # prints a connection URI on stdout
#   scripts/pg_test_server.sh stop DIR
#
# With OWNER_PID (a test binary's own pid), a detached watcher stops the
# server and removes DIR once that process is gone, so a test killed by a
# timeout or a crash leaves no server behind.
#
# DIR/data is the cluster (created by the first start, reused by later
# ones), DIR/sock the Unix socket directory (no TCP: listen_addresses=''),
# DIR/log the server log. Trust authentication for the superuser `kvb`.
# The server binaries come from the Debian package `postgresql`
# (/usr/lib/postgresql/<version>/bin, the newest version is used; PG_BIN
# overrides). initdb refuses to run as root: as root, DIR is handed to the
# `postgres` system user and the server runs as that user.
#
# Exit status: 0 ok, 2 usage, 3 PostgreSQL binaries missing, 1 otherwise.
set -euo pipefail

usage() {
  echo "usage: $0 start DIR [OWNER_PID] | stop DIR" >&2
  exit 2
}
[ $# -eq 2 ] || [ $# -eq 3 ] || usage
cmd=$1
dir=$2
owner=${3:-}
self=$(cd "$(dirname "$0")" && pwd -P)/$(basename "$0")

find_bin() {
  if [ -n "${PG_BIN:-}" ]; then
    echo "$PG_BIN"
    return
  fi
  local d best=""
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] || continue
    best=$(printf '%s\n%s\n' "$best" "$d" | sed '/^$/d' | sort -V | tail -n 1)
  done
  if [ -z "$best" ] && command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    best=$(dirname "$(command -v initdb)")
  fi
  echo "$best"
}

bin=$(find_bin)
if [ -z "$bin" ] || [ ! -x "$bin/initdb" ] || [ ! -x "$bin/pg_ctl" ]; then
  echo "pg_test_server: PostgreSQL server binaries (initdb, pg_ctl) not found under /usr/lib/postgresql/*/bin:" \
       "install the Debian package 'postgresql' (scripts/packages.sh lists it)" >&2
  exit 3
fi

# As root, everything runs as the `postgres` system user.
as_server_user() {
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

case "$cmd" in
  start)
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd -P)
    # The socket path must fit in sockaddr_un (107 bytes with its file name).
    if [ ${#dir} -gt 80 ]; then
      echo "pg_test_server: $dir is too long for a Unix socket path; use a shorter directory" >&2
      exit 1
    fi
    if [ "$(id -u)" -eq 0 ]; then
      if ! id postgres >/dev/null 2>&1; then
        echo "pg_test_server: running as root needs the 'postgres' system user (package 'postgresql')" >&2
        exit 3
      fi
      chown postgres: "$dir"
      # The server user must reach DIR through its parents.
      if ! runuser -u postgres -- test -w "$dir"; then
        echo "pg_test_server: user postgres cannot write $dir (a parent directory is not searchable);" \
             "use a directory under /tmp" >&2
        exit 1
      fi
    fi
    as_server_user mkdir -p "$dir/sock"
    if [ ! -f "$dir/data/PG_VERSION" ]; then
      # --no-sync: a test cluster need not survive a power loss while it is
      # created; the server itself keeps fsync on.
      as_server_user "$bin/initdb" -D "$dir/data" -U kvb -A trust -E UTF8 --locale=C --no-sync \
        >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; exit 1; }
    fi
    # Lease tests and the benchmark open many connections; small buffers
    # keep several servers side by side cheap.
    as_server_user "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w -t 60 \
      -o "-c listen_addresses='' -c unix_socket_directories='$dir/sock' -c unix_socket_permissions=0777 \
          -c max_connections=200 -c shared_buffers=32MB" start >/dev/null \
      || { tail -n 30 "$dir/log" >&2 || true; exit 1; }
    if [ -n "$owner" ]; then
      # Detached (own session, no inherited descriptors: the caller reading
      # our stdout must see it end).
      setsid -f bash -c 'while kill -0 "$1" 2>/dev/null; do sleep 1; done; "$2" stop "$3"; rm -rf "$3"' \
        watcher "$owner" "$self" "$dir" </dev/null >/dev/null 2>&1
    fi
    echo "postgresql:///postgres?host=$dir/sock&user=kvb"
    ;;
  stop)
    [ -d "$dir" ] || exit 0
    dir=$(cd "$dir" && pwd -P)
    [ -f "$dir/data/postmaster.pid" ] || exit 0
    as_server_user "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >/dev/null
    ;;
  *) usage ;;
esac
