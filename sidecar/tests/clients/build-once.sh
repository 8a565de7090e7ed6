#!/usr/bin/env bash
# Installs one program of the client matrix once per version of its files: copies DIR into a
# cache outside the clone, runs COMMAND there (which fetches the pinned client library from its
# registry), and prints the path of a launcher that runs RUN there with the program's arguments.
#
# Usage: build-once.sh DIR NAME RUN COMMAND...
set -euo pipefail
dir=$1 name=$2 run=$3
shift 3
cache=${EDEN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/eden}
hash=$(cd "$dir" && find . -type f | sort | xargs cat | sha256sum | cut -c1-12)
out="$cache/$name-$hash"
if [ ! -e "$out/installed" ]; then
  command -v "$1" >/dev/null || { echo "$name: $1 is required" >&2; exit 1; }
  echo "installing $name into $out (first time only)" >&2
  rm -rf "$out"
  mkdir -p "$out"
  cp -r "$dir/." "$out"
  (cd "$out" && "$@" >build.log 2>&1) || { cat "$out/build.log" >&2; exit 1; }
  printf '#!/bin/sh\ncd "$(dirname "$0")" && exec %s "$@"\n' "$run" >"$out/run"
  chmod +x "$out/run"
  touch "$out/installed"
fi
echo "$out/run"
