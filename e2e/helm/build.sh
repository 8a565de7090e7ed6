#!/usr/bin/env bash
# Builds Helm from its published module once per version and prints its path.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
version=$(awk '$1 == "helm.sh/helm/v3" { print $2; exit }' "$here/go.mod")
exec bash "$here/../go-build.sh" "$here" "helm-$version" helm.sh/helm/v3/cmd/helm \
  -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$version"
