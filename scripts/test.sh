#!/usr/bin/env bash
# The test command: installs what the tests need when it is missing, then runs
# every test. Works on a fresh Debian 12 machine as root (CI) or with sudo.
#
# What the tests start for real: redis-server and redis-sentinel, nginx,
# HAProxy, edgenode processes, and the ARM release binaries under qemu-user.
set -euo pipefail
cd "$(dirname "$0")/.."

# Every package, rustup target and component the build and the tests need,
# each detected by a file it provides (scripts/needs.sh; scripts/doctor.sh
# lists what is missing without installing anything).
# shellcheck source=scripts/needs.sh
. scripts/needs.sh
groups=("${NEEDS_TEST_GROUPS[@]}")
# tests/containers.rs builds the container image from the static x86_64 musl
# binary where podman (or docker) is installed, and skips that part
# otherwise. podman itself is not installed here (about 15 packages with its
# network stack): `apt-get install --no-install-recommends podman` for it.
if command -v podman >/dev/null 2>&1 || command -v docker >/dev/null 2>&1; then
  groups+=(x86_64-unknown-linux-musl)
fi
NEEDS_WHO=test.sh needs_install "${groups[@]}"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
# Debian starts these as services on install; the tests start their own.
for svc in redis-server nginx haproxy; do
  (command -v systemctl >/dev/null && systemctl is-system-running >/dev/null 2>&1 && $SUDO systemctl stop "$svc") || true
done

echo "== format and lints"
bash scripts/check-sled-patch.sh
cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings

echo "== systemd units"
cargo build --release --quiet
bash scripts/check-systemd.sh "${CARGO_TARGET_DIR:-target}/release/edgenode"

echo "== tests"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run, summed over every test binary.
# A test that cannot run here passes after printing a line starting "SKIPPED "
# or "SKIPPED:" with the reason: it counts as skipped, not passed.
awk '/^test result:/ { p += $4; f += $6; i += $8 } /^SKIPPED[ :]/ { s++ }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p - s, f, i + s }' "$log"
exit "$status"
