#!/usr/bin/env bash
# Builds the Java programs of the client matrix (Jedis, Lettuce: pom.xml's versions, from Maven
# Central, Maven's local repository in the cache too) once per version of their files and prints
# a launcher's path: `run MAIN-CLASS ARGS...`.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${EDEN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/eden}
exec bash "$here/../build-once.sh" "$here" java-clients "java -cp 'target/classes:target/dependency/*'" \
  mvn -B -q -Dmaven.repo.local="$cache/maven" compile dependency:copy-dependencies
