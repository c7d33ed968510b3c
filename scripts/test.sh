#!/usr/bin/env bash
# The test command: installs what the tests need when it is missing, then runs
# every test. Works on a fresh Debian 12 machine as root (CI) or with sudo.
#
# What the tests start for real: redis-server and redis-sentinel, nginx,
# HAProxy, edgenode processes, and the ARM release binaries under qemu-user.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# command → Debian package that provides it
declare -A NEEDS=(
  [redis-server]=redis-server
  [redis-sentinel]=redis-sentinel
  [redis-cli]=redis-tools
  [nginx]=nginx
  [haproxy]=haproxy
  [systemd-analyze]=systemd
  [qemu-aarch64-static]=qemu-user-static
  [aarch64-linux-gnu-gcc]=gcc-aarch64-linux-gnu
  [arm-linux-gnueabihf-gcc]=gcc-arm-linux-gnueabihf
  [wrk]=wrk
)
missing=()
for cmd in "${!NEEDS[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${NEEDS[$cmd]}")
done
# armhf C library for linking and for qemu-arm's -L root
[ -e /usr/arm-linux-gnueabihf/lib/libc.so ] || missing+=(libc6-dev-armhf-cross)
# tests/systemd_nspawn.rs: a bookworm root built by debootstrap, booted by nspawn
[ -e /usr/sbin/debootstrap ] || missing+=(debootstrap)
[ -e /usr/bin/systemd-nspawn ] || missing+=(systemd-container)
if [ ${#missing[@]} -gt 0 ]; then
  echo "test.sh: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian starts these as services on install; the tests start their own.
for svc in redis-server nginx haproxy; do
  (command -v systemctl >/dev/null && systemctl is-system-running >/dev/null 2>&1 && $SUDO systemctl stop "$svc") || true
done

for target in aarch64-unknown-linux-musl armv7-unknown-linux-gnueabihf x86_64-unknown-linux-musl; do
  rustup target list --installed | grep -qx "$target" || rustup target add "$target"
done
rustup component list --installed | grep -q '^clippy' || rustup component add clippy
rustup component list --installed | grep -q '^rustfmt' || rustup component add rustfmt

echo "== format and lints"
cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings

echo "== systemd units"
cargo build --release --quiet
bash scripts/check-systemd.sh target/release/edgenode

echo "== tests"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, i }' "$log"
exit "$status"
