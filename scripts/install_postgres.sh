#!/usr/bin/env bash
# Install Debian's PostgreSQL server for tests/test_replicas.py, which starts a cluster of its
# own in a temporary folder (initdb + pg_ctl) and two `bentoml serve` replicas sharing it.
# Idempotent: does nothing when initdb is already there. Needs root or sudo to install;
# without either it only says so (and fails when CI is set, where the replica tests must run).
#
#   bash scripts/install_postgres.sh      # prints what it found or installed
set -euo pipefail

find_initdb() { ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1 || true; }

found=$(find_initdb)
if [ -n "$found" ]; then
  echo "install_postgres: $("$found" --version) already at $found"
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  echo "install_postgres: PostgreSQL is missing and installing it needs root or sudo:" >&2
  echo "  apt-get install -y postgresql" >&2
  [ -n "${CI:-}" ] && exit 1
  exit 0
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
export DEBIAN_FRONTEND=noninteractive
# The package's own cluster is not used (the tests start theirs): no service is started.
if ! { "${sudo[@]}" apt-get update -q && \
       "${sudo[@]}" apt-get install -y -q --no-install-recommends postgresql; } >"$log" 2>&1; then
  tail -n 30 "$log" >&2
  echo "install_postgres: apt-get failed (log above)" >&2
  exit 1
fi
found=$(find_initdb)
echo "install_postgres: installed $("$found" --version) at $found"
