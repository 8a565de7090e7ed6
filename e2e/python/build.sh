#!/usr/bin/env bash
# Makes a Python virtualenv with the client libraries of requirements.txt once per version of
# that file, in a cache outside the clone, and prints its interpreter's path. The first call
# installs from PyPI (seconds); later calls return at once.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${EDEN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/eden}
hash=$(sha256sum "$here/requirements.txt" | cut -c1-12)
venv="$cache/python-$hash"
if [ ! -e "$venv/installed" ]; then
  command -v python3 >/dev/null || { echo "python/build.sh: python3 is required" >&2; exit 1; }
  echo "installing the Python clients into $venv (first time only)" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$here/requirements.txt" >&2
  touch "$venv/installed"
fi
echo "$venv/bin/python"
