#!/usr/bin/env bash
# Installs the servers that some tests use (PostgreSQL) from Debian's packages when they are
# missing and this machine can install packages. Tests that need a server skip when it is absent.
set -u
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing PostgreSQL for the registry's database tests"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
    || echo "warning: could not install PostgreSQL; its tests will be skipped"
else
  echo "note: PostgreSQL not installed and cannot install it here; its tests will be skipped"
fi
exit 0
