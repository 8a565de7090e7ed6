#!/usr/bin/env bash
# Builds go-redis's program of the client matrix once per source version and prints its path.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/../../../../e2e/go-build.sh" "$here" go-redis-matrix . -ldflags "-s -w"
