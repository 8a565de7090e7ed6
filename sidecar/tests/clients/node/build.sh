#!/usr/bin/env bash
# Installs node-redis's program of the client matrix (package-lock.json's versions, from npm)
# once per version of its files, in a cache outside the clone, and prints a launcher's path.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${EDEN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/eden}
files=(package.json package-lock.json matrix.mjs)
hash=$(cd "$here" && cat "${files[@]}" | sha256sum | cut -c1-12)
dir="$cache/node-clients-$hash"
if [ ! -e "$dir/installed" ]; then
  command -v npm >/dev/null || { echo "node/build.sh: Node.js and npm are required" >&2; exit 1; }
  echo "installing node-redis into $dir (first time only)" >&2
  rm -rf "$dir"
  mkdir -p "$dir"
  (cd "$here" && cp "${files[@]}" "$dir")
  (cd "$dir" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >&2)
  printf '#!/bin/sh\nexec node "$(dirname "$0")/matrix.mjs" "$@"\n' > "$dir/run"
  chmod +x "$dir/run"
  touch "$dir/installed"
fi
echo "$dir/run"
