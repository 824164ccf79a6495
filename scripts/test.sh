#!/usr/bin/env bash
# Install everything the suite needs on a fresh Debian 12 machine, then run lint, types and
# tests. This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  need=()
  # gcc, libssl-dev and python3-dev build the agent's C measurement (agent/_native.c)
  for pkg in openssh-server aide debsums prometheus-alertmanager systemd rpm libcap2-bin \
    gcc libc6-dev libssl-dev python3-dev; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need+=("$pkg")
  done
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
  fi
fi

# The PostgreSQL tests need a server on 127.0.0.1:5432 with a database "test" that user
# postgres reaches without a password; where none answers, set up Debian's (a test machine).
if ! (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  if ! dpkg-query -W -f='${Status}' postgresql 2>/dev/null | grep -q "ok installed"; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql
  fi
  cluster=$(pg_lsclusters -h | awk '$3 == 5432 { print $1 " " $2; exit }')
  if [ -z "$cluster" ]; then
    echo "error: no PostgreSQL cluster on port 5432 (pg_lsclusters)" >&2
    exit 1
  fi
  version=${cluster% *} name=${cluster#* }
  hba=/etc/postgresql/$version/$name/pg_hba.conf
  grep -q "^host all postgres 127.0.0.1/32 trust" "$hba" \
    || sed -i '1i host all postgres 127.0.0.1/32 trust' "$hba"
  if pg_ctlcluster "$version" "$name" status >/dev/null 2>&1; then
    pg_ctlcluster --skip-systemctl-redirect "$version" "$name" reload
  else
    pg_ctlcluster --skip-systemctl-redirect "$version" "$name" start
  fi
  exists=$(su postgres -c "psql -qtAc \"SELECT 1 FROM pg_database WHERE datname = 'test'\"")
  [ "$exists" = 1 ] || su postgres -c "createdb test"
fi

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[dev]'

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/pytest "$@"
