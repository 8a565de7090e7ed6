#!/usr/bin/env bash
# Installs node-redis's program of the client matrix (package-lock.json's versions, from npm)
# once per version of its files and prints a launcher's path.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/../build-once.sh" "$here" node-clients "node matrix.mjs" \
  npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
