#!/usr/bin/env bash
# Install PostgreSQL from Debian packages, start a throwaway cluster on loopback, create a
# database and print its URL on stdout (everything else goes to stderr).
#
#   export ASOBI_TEST_DATABASE_URL="$(.ci/postgres.sh)"
#
# Must run as root (apt, and the cluster runs as the postgres user).  Idempotent: a second run
# reuses the cluster.
set -euo pipefail

PORT="${ASOBI_PG_PORT:-54329}"
CLUSTER="asobi"
DB="asobi_test"
USER_NAME="asobi"
PASSWORD="asobi-test-password"

if [ "${ASOBI_PG_SKIP_APT:-}" != 1 ]; then
  (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql) >&2
fi
VERSION="$(ls /usr/lib/postgresql | sort -V | tail -n 1)"

if ! pg_lsclusters -h | awk '{print $2}' | grep -qx "$CLUSTER"; then
  pg_createcluster "$VERSION" "$CLUSTER" --port "$PORT" \
    -- --auth-local=peer --auth-host=scram-sha-256 >&2
  # Tests create and drop many databases: loopback only, and speed over crash safety.
  cat >>"/etc/postgresql/$VERSION/$CLUSTER/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 200
CONF
fi
pg_ctlcluster "$VERSION" "$CLUSTER" start >&2 2>/dev/null || pg_ctlcluster "$VERSION" "$CLUSTER" status >&2

for _ in $(seq 1 50); do
  if su postgres -c "psql -p $PORT -Atqc 'select 1'" >/dev/null 2>&1; then break; fi
  sleep 0.2
done

su postgres -c "psql -p $PORT -v ON_ERROR_STOP=1 -qAt" >&2 <<SQL
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$USER_NAME') THEN
    CREATE ROLE $USER_NAME LOGIN CREATEDB PASSWORD '$PASSWORD';
  END IF;
END \$\$;
SQL
if ! su postgres -c "psql -p $PORT -Atqc \"select 1 from pg_database where datname = '$DB'\"" | grep -q 1; then
  su postgres -c "createdb -p $PORT -O $USER_NAME $DB" >&2
fi

echo "postgresql://$USER_NAME:$PASSWORD@127.0.0.1:$PORT/$DB"
