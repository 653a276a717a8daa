#!/usr/bin/env bash
# Installs what ramkv needs to build and test, from Debian 12's packages. Idempotent:
# packages already present are left alone, and `apt-get update` runs only when something
# is missing. Needs root (or sudo) for the install itself.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config git
  g++ clang clang-format libclang-rt-14-dev
  liburing-dev libibverbs-dev libxxhash-dev
  libbenchmark-dev catch2 libcli11-dev libfmt-dev
  e2fsprogs  # mkfs.ext4: the backup's full-disk test formats a small loop-mounted image
  gnuplot-nox  # ramkv-bench recovery --plot: the time-to-recovery timeline as a PNG
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#packages[@]} packages present"
  exit 0
fi

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "setup: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  sudo_cmd=(sudo)
fi
echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "setup: done"
