#!/usr/bin/env bash
# Builds one of the Go programs the tests and the demo run (the control plane, Helm) once per
# source version, into a cache outside the clone, and prints the binary's path. A first build
# takes minutes on two cores (at the lowest CPU priority, so the machine stays usable); later
# calls return at once.
#
# Usage: go-build.sh DIR NAME PACKAGE [go build flags]
#   DIR      the Go module (go.mod, go.sum, any *.go), whose contents key the cache
#   NAME     the binary's name in the cache, before the key
#   PACKAGE  what to build, relative to DIR
set -euo pipefail
shopt -s nullglob
dir=$1 name=$2 package=$3
shift 3
cache=${EDEN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/eden}
hash=$(cat "$dir/go.mod" "$dir/go.sum" "$dir"/*.go | sha256sum | cut -c1-12)
bin="$cache/bin/$name-$hash"
if [ ! -x "$bin" ]; then
  command -v go >/dev/null || { echo "go-build.sh: Go is required to build $name" >&2; exit 1; }
  mkdir -p "$cache/bin"
  echo "building $name into $cache/bin (first time only; minutes)" >&2
  (cd "$dir" && GOTOOLCHAIN=local GOFLAGS=-mod=readonly nice -n 19 go build -trimpath "$@" -o "$bin.partial" "$package")
  mv "$bin.partial" "$bin"
fi
echo "$bin"
