#!/usr/bin/env bash
# Builds the Java programs of the client matrix (Jedis, Lettuce: pom.xml's versions, from Maven
# Central) once per version of their sources, in a cache outside the clone (Maven's local
# repository too), and prints a launcher's path: `run MAIN-CLASS ARGS...`.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${EDEN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/eden}
hash=$(cd "$here" && find pom.xml src -type f | sort | xargs cat | sha256sum | cut -c1-12)
dir="$cache/java-clients-$hash"
if [ ! -e "$dir/installed" ]; then
  command -v mvn >/dev/null || { echo "java/build.sh: Maven and a JDK 17 are required" >&2; exit 1; }
  echo "building the Java clients into $dir (first time only)" >&2
  rm -rf "$dir"
  mkdir -p "$dir"
  cp -r "$here/pom.xml" "$here/src" "$dir"
  (cd "$dir" && mvn -B -q -Dmaven.repo.local="$cache/maven" compile dependency:copy-dependencies >build.log 2>&1) \
    || { cat "$dir/build.log" >&2; exit 1; }
  printf '#!/bin/sh\nhere=$(dirname "$0")\nexec java -cp "$here/target/classes:$here/target/dependency/*" "$@"\n' > "$dir/run"
  chmod +x "$dir/run"
  touch "$dir/installed"
fi
echo "$dir/run"
