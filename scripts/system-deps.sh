#!/usr/bin/env bash
# System packages the test suite needs beyond Python (installed only when missing).
# Root installs them with apt-get; otherwise we print what is missing and carry on.
set -euo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
# Node.js and npm build the ws_bridge plugin's browser OPAQUE client (scripts/build-js.sh).
command -v npm >/dev/null 2>&1 || need+=(nodejs npm)
# PostgreSQL server binaries (initdb, pg_ctl) for the storage_postgres plugin's tests.
command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null \
  || need+=(postgresql)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing system packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
else
  echo "warning: missing system packages (${need[*]}); install them with your package manager" >&2
fi
