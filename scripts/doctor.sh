#!/usr/bin/env bash
# Lists what this machine is missing to build, test and release edgenode, each
# missing file with what provides it, before anything is built. Installs
# nothing: scripts/test.sh and scripts/release.sh install from the same list
# (scripts/needs.sh).
#
# Usage: scripts/doctor.sh [GROUP...]
#   GROUP   host, test, bench, containers or a release target triple (see
#           scripts/needs.sh);
#           default: everything scripts/test.sh and scripts/release.sh need
#
# Exit status: 0 if nothing is missing, 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/needs.sh
. scripts/needs.sh

case ${1:-} in -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;; esac
groups=("$@")
[ ${#groups[@]} -gt 0 ] || groups=(host test aarch64-unknown-linux-musl armv7-unknown-linux-gnueabihf x86_64-unknown-linux-musl)

missing=$(needs_missing "${groups[@]}")
if [ -z "$missing" ]; then
  echo "doctor: nothing missing for ${groups[*]}"
  exit 0
fi
echo "doctor: missing for ${groups[*]} (file -> provided by):"
apt=() rust=()
while read -r file provider; do
  printf '  %-58s -> %s\n' "$file" "$provider"
  case $provider in
    rustup) rust+=("install rustup: https://rustup.rs") ;;
    rustup-target:*) rust+=("rustup target add ${provider#rustup-target:}") ;;
    rustup-component:*) rust+=("rustup component add ${provider#rustup-component:}") ;;
    *) [[ " ${apt[*]} " == *" $provider "* ]] || apt+=("$provider") ;;
  esac
done <<<"$missing"
echo "doctor: to install (bash scripts/test.sh and scripts/release.sh do it themselves):"
if [ ${#apt[@]} -gt 0 ]; then echo "  apt-get install --no-install-recommends ${apt[*]}"; fi
for r in "${rust[@]}"; do echo "  $r"; done
exit 1
