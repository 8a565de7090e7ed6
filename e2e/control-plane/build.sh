#!/usr/bin/env bash
# Builds eden-control-plane (etcd + kube-apiserver) once per source version and prints its path.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
version=$(awk '$1 == "k8s.io/kubernetes" { print $2; exit }' "$here/go.mod")
minor=$(echo "$version" | cut -d. -f2)
pkg=k8s.io/component-base/version
exec bash "$here/../go-build.sh" "$here" "eden-control-plane-$version" . \
  -ldflags "-s -w -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
