#!/usr/bin/env bash
# Builds eden-control-plane (etcd + kube-apiserver) once per source version, into a cache outside
# the clone, and prints the binary's path. The first build takes several minutes on two cores;
# later calls return at once.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${EDEN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/eden}
version=$(awk '$1 == "k8s.io/kubernetes" { print $2; exit }' "$here/go.mod")
minor=$(echo "$version" | cut -d. -f2)
hash=$(cat "$here/go.mod" "$here/go.sum" "$here"/*.go | sha256sum | cut -c1-12)
bin="$cache/bin/eden-control-plane-$version-$hash"
if [ ! -x "$bin" ]; then
  command -v go >/dev/null || { echo "build.sh: Go is required to build the control plane" >&2; exit 1; }
  mkdir -p "$cache/bin"
  echo "building eden-control-plane $version into $cache/bin (first time only; several minutes)" >&2
  pkg=k8s.io/component-base/version
  (cd "$here" && GOTOOLCHAIN=local GOFLAGS=-mod=readonly go build -trimpath \
    -ldflags "-s -w -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor" \
    -o "$bin.partial" .)
  mv "$bin.partial" "$bin"
fi
echo "$bin"
