#!/usr/bin/env bash
# Builds argocd-health once per source version and prints its path.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/../go-build.sh" "$here" argocd-health . -ldflags "-s -w"
