# Sourced by .ci/run: start a throwaway PostgreSQL on loopback for the broker's
# PostgreSQL tests and export FIRMGATE_TEST_PG_URL. Debian's server refuses to
# run as root, so it runs as the `postgres` user in a fresh data directory.
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
PGDATA=$(mktemp -d /tmp/firmgate-ci-pg.XXXXXX)
PGPORT=${FIRMGATE_CI_PG_PORT:-55432}
chown postgres "$PGDATA"
runuser -u postgres -- "$PGBIN/initdb" -D "$PGDATA" -A trust -U postgres >/dev/null
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDATA" -l "$PGDATA/server.log" -w \
  -o "-h 127.0.0.1 -p $PGPORT -k $PGDATA -c max_connections=200" start >/dev/null
export FIRMGATE_TEST_PG_URL="postgresql+psycopg://postgres@127.0.0.1:$PGPORT/postgres"
export FIRMGATE_TEST_PG_BIN="$PGBIN" FIRMGATE_TEST_PG_DATA="$PGDATA"
echo "PostgreSQL running on 127.0.0.1:$PGPORT ($PGDATA)"
