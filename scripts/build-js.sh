#!/usr/bin/env bash
# Build the ws_bridge plugin's browser OPAQUE client (qpc_ws_bridge/static/qpc-opaque.js)
# from plugins/ws_bridge/js: its dependencies (@noble/curves, @noble/hashes, esbuild) come
# from npm at the versions package-lock.json pins.
set -euo pipefail
cd "$(dirname "$0")/../plugins/ws_bridge/js"
if ! command -v npm >/dev/null 2>&1; then
  echo "error: npm (Node.js 18 or later) is needed to build qpc-opaque.js" >&2
  exit 1
fi
npm ci --no-audit --no-fund --loglevel=error
npm run --silent build
