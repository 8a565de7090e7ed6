#!/usr/bin/env bash
# Builds CoreDNS (the test node's cluster DNS) from its published module once per version and
# prints its path. Static, so its image needs nothing but the binary.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
version=$(awk '$1 == "github.com/coredns/coredns" { print $2; exit }' "$here/go.mod")
CGO_ENABLED=0 exec bash "$here/../go-build.sh" "$here" "coredns-$version" . -ldflags "-s -w"
