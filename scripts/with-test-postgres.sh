#!/usr/bin/env bash
# Run a command (`make test`'s pytest) with FIRMGATE_TEST_PG_URL naming a PostgreSQL server for the
# broker's PostgreSQL tests, and exit with the command's status.
# - FIRMGATE_TEST_PG_URL already set: that server is used, nothing is started.
# - Else, with the server binaries installed (Debian's postgresql, as `make deps` installs), a throwaway
#   cluster is created in a fresh temporary directory, listening on 127.0.0.1 only with trust auth, and is
#   stopped and deleted when the command ends. Debian's server refuses to run as root, so under root it
#   runs as the `postgres` user.
# - Else the command runs without one; FIRMGATE_TEST_PG_SKIP says why (tests/conftest.py prints it).
set -uo pipefail

if [ -n "${FIRMGATE_TEST_PG_URL:-}" ]; then
  exec "$@"
fi

PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
if [ -z "$PGBIN" ] || [ ! -x "$PGBIN/initdb" ]; then
  export FIRMGATE_TEST_PG_SKIP="no PostgreSQL server installed; make deps installs it"
  exec "$@"
fi
AS=()
if [ "$(id -u)" = 0 ]; then
  if ! id postgres >/dev/null 2>&1 || ! command -v runuser >/dev/null; then
    export FIRMGATE_TEST_PG_SKIP="running as root without a 'postgres' user or runuser to start the server"
    exec "$@"
  fi
  AS=(runuser -u postgres --)
fi

PGDIR=$(mktemp -d "${TMPDIR:-/tmp}/firmgate-test-pg.XXXXXX")
[ "$(id -u)" = 0 ] && chown postgres "$PGDIR"
PGPORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

stop() {
  "${AS[@]}" "$PGBIN/pg_ctl" -D "$PGDIR/data" -m fast -w stop >/dev/null 2>&1
  rm -rf "$PGDIR"
}

if ! "${AS[@]}" "$PGBIN/initdb" -D "$PGDIR/data" -A trust -U postgres --no-sync >"$PGDIR/initdb.log" 2>&1 \
  || ! "${AS[@]}" "$PGBIN/pg_ctl" -D "$PGDIR/data" -l "$PGDIR/server.log" -w \
       -o "-h 127.0.0.1 -p $PGPORT -k $PGDIR -c max_connections=200 -c fsync=off" start >/dev/null 2>&1; then
  echo "make test: could not start a throwaway PostgreSQL (logs were in $PGDIR); its tests will skip" >&2
  tail -n 5 "$PGDIR"/*.log >&2 2>/dev/null
  stop
  export FIRMGATE_TEST_PG_SKIP="the throwaway PostgreSQL did not start"
  exec "$@"
fi
trap stop EXIT
trap 'exit 130' INT TERM
export FIRMGATE_TEST_PG_URL="postgresql+psycopg://postgres@127.0.0.1:$PGPORT/postgres"
echo "make test: throwaway PostgreSQL on 127.0.0.1:$PGPORT (stopped when the tests end)"
"$@"
