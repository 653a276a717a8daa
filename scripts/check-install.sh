#!/usr/bin/env bash
# Installs a build into a temporary prefix and builds examples/embed against it with
# find_package(ramkv): the way another project embeds the client. Runs the example
# against a coordinator that is not there and expects its clear error.
#   scripts/check-install.sh BUILD_DIR
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:?usage: check-install.sh BUILD_DIR}
prefix=$(mktemp -d)
trap 'rm -rf "$prefix"' EXIT
cmake --install "$build" --prefix "$prefix" >/dev/null
cmake -S "$root/examples/embed" -B "$prefix/embed-build" -G Ninja \
  -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
cmake --build "$prefix/embed-build" >/dev/null
set +e
out=$("$prefix/embed-build/embed" 127.0.0.1:1 2>&1)
rc=$?
set -e
echo "$out"
[ $rc -eq 1 ] && grep -q "connect:" <<<"$out" && echo "install: find_package(ramkv) works"
