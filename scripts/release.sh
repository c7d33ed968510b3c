#!/usr/bin/env bash
# Builds the release binaries with Debian's cross toolchains (no Docker) and
# packs one tarball per target:
#
#   dist/edgenode-<version>-<target>.tar.gz    binary, systemd units, example
#                                              config, shell completions, man
#                                              page, install.sh, README,
#                                              LICENSE and licenses/ (the
#                                              vendored sled's)
#   dist/SHA256SUMS
#
# Usage: scripts/release.sh [--no-package] [TARGET...]
#   TARGET        any of the default three (all of them when none is given):
#                   aarch64-unknown-linux-musl     Pi 3/4/5, Zero 2 W, 64-bit OS (static)
#                   armv7-unknown-linux-gnueabihf  Pi 2/3/4, 32-bit Raspberry Pi OS (glibc)
#                   x86_64-unknown-linux-musl      x86-64 mini PCs, testing (static)
#                 ARMv6 (Pi 1, Zero W) is built with `cross` only: see cross.toml.
#   --no-package  build, strip and check only; write nothing to dist/
#
# Installs the missing Debian packages (apt-get, as root or with sudo) and
# rustup targets first. Honours CARGO_TARGET_DIR. Prints each stripped
# binary's size and, for the glibc build, the oldest glibc it runs on.
set -euo pipefail
cd "$(dirname "$0")/.."

ALL_TARGETS=(aarch64-unknown-linux-musl armv7-unknown-linux-gnueabihf x86_64-unknown-linux-musl)

die() { echo "release.sh: $*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

package=1
targets=()
for arg in "$@"; do
  case $arg in
    --no-package) package=0 ;;
    -h|--help) usage; exit 0 ;;
    -*) die "unknown option $arg (see --help)" ;;
    *)
      [[ " ${ALL_TARGETS[*]} " == *" $arg "* ]] || die "unknown target $arg (one of: ${ALL_TARGETS[*]})"
      targets+=("$arg") ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=("${ALL_TARGETS[@]}")

# Per target: binutils prefix ("" = the host's) and qemu command ("" = runs
# natively).
prefix_of() {
  case $1 in
    aarch64-*) echo aarch64-linux-gnu- ;;
    armv7-*) echo arm-linux-gnueabihf- ;;
    *) echo "" ;;
  esac
}
qemu_of() {
  case $1 in
    aarch64-*) echo qemu-aarch64-static ;;
    armv7-*) echo "qemu-arm-static -L /usr/arm-linux-gnueabihf" ;;
    *) echo "" ;;
  esac
}

# ---- what the build needs ------------------------------------------------------
# Each target's packages and rustup target, detected by a file each provides
# (scripts/needs.sh, the list scripts/test.sh and scripts/doctor.sh use).
# shellcheck source=scripts/needs.sh
. scripts/needs.sh
NEEDS_WHO=release.sh needs_install host "${targets[@]}" || die "cannot install what the build needs (bash scripts/doctor.sh ${targets[*]} lists it)"

version=$(awk -F'"' '/^\[/{pkg=($0=="[package]")} pkg && /^version *=/{print $2; exit}' Cargo.toml)
[ -n "$version" ] || die "no version in Cargo.toml"
target_dir=${CARGO_TARGET_DIR:-target}

# ---- build ---------------------------------------------------------------------------
args=()
for t in "${targets[@]}"; do args+=(--target "$t"); done
echo "release.sh: building edgenode $version for ${targets[*]}"
start=$SECONDS
# One cargo run for all targets: the host-side build scripts and proc macros
# are compiled once. --locked: a release builds exactly the committed Cargo.lock.
cargo build --release --locked "${args[@]}"
echo "release.sh: built in $((SECONDS - start)) s"

# The oldest glibc the binary asks for: the highest GLIBC_x.y symbol version.
min_glibc() { "$(prefix_of "$1")objdump" -T "$2" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n1; }
# The oldest Raspberry Pi OS (Debian) release whose glibc is at least $1.
pi_os_for() {
  local rel
  for rel in "2.28 Buster (Debian 10)" "2.31 Bullseye (Debian 11)" "2.36 Bookworm (Debian 12)" "2.41 Trixie (Debian 13)"; do
    if [ "$(printf '%s\n' "$1" "${rel%% *}" | sort -V | tail -n1)" = "${rel%% *}" ]; then
      echo "${rel#* }"; return
    fi
  done
  echo "none released yet (glibc $1 is newer than Trixie's 2.41)"
}

stage_root=$(mktemp -d)
trap 'rm -rf "$stage_root"' EXIT
declare -A GLIBC=()
for t in "${targets[@]}"; do
  bin=$stage_root/$t/edgenode
  mkdir -p "$stage_root/$t"
  cp "$target_dir/$t/release/edgenode" "$bin"
  # The release profile strips already; this keeps the tarball stripped even if
  # someone builds with strip = false to profile.
  "$(prefix_of "$t")strip" "$bin"
  # The binary must start (under qemu for the ARM ones) and name its target.
  # shellcheck disable=SC2046 # the qemu command is meant to split into words
  ver=$($(qemu_of "$t") "$bin" --version) || die "$t: the binary does not run: $ver"
  [[ $ver == *"$t"* ]] || die "$t: --version says '$ver'"
  size=$(stat -c %s "$bin")
  printf 'release.sh: %-32s %9d bytes (%s MB) stripped  [%s]\n' "$t" "$size" \
    "$(awk -v s="$size" 'BEGIN{printf "%.2f", s/1e6}')" "$ver"
  if [[ $t == *-gnu* ]]; then
    GLIBC[$t]=$(min_glibc "$t" "$bin")
    echo "release.sh: $t needs glibc >= ${GLIBC[$t]}: Raspberry Pi OS $(pi_os_for "${GLIBC[$t]}") or later"
  fi
done
[ "$package" = 1 ] || exit 0

# ---- shell completions and man page --------------------------------------------------
# Generated from the one declaration of the flags by edgenode-docs (cargo
# feature "docs"), built for the host: the files do not depend on the target,
# and the generators stay out of the server binary's size budget (src/docs.rs).
docs_dir=$stage_root/docs
cargo run --quiet --locked --features docs --bin edgenode-docs -- "$docs_dir" \
  || die "edgenode-docs failed"
bash -n "$docs_dir/completions/edgenode.bash" || die "the bash completion script does not parse"
[ -s "$docs_dir/man/edgenode.1" ] || die "no man page"

# ---- package ---------------------------------------------------------------------------
readme() {  # target → the tarball's README
  local t=$1 name=$2
  case $t in
    aarch64-*) cat <<EOF
edgenode $version for 64-bit ARM (aarch64), statically linked (musl).

Boards: Raspberry Pi 3, 3+, 4, 400, 5, Zero 2 W and Compute Modules 3/4/5,
running a 64-bit OS: Raspberry Pi OS (64-bit), Ubuntu, DietPi, ... — any
distribution and any version, since the binary needs no system library.
Check on the board:  uname -m   prints aarch64.
EOF
    ;;
    armv7-*) cat <<EOF
edgenode $version for 32-bit ARMv7 (armhf), dynamically linked to glibc.

Boards: Raspberry Pi 2, 3, 3+, 4, 400 and Zero 2 W running 32-bit Raspberry Pi
OS. Check on the board:  dpkg --print-architecture   prints armhf.
(If  uname -m  prints aarch64, the kernel is 64-bit: the aarch64 release, which
is static, runs there as well.)

Needs glibc ${GLIBC[$t]} or newer: Raspberry Pi OS $(pi_os_for "${GLIBC[$t]}") or later.
Check with:  ldd --version | head -n1   (Buster has 2.28, Bullseye 2.31,
Bookworm 2.36, Trixie 2.41). On an older release use the aarch64 build on a
64-bit OS, or build with cross (see cross.toml in the source).

Not for the Pi 1, Zero and Zero W (ARMv6,  uname -m  prints armv6l): this
binary stops there with "Illegal instruction". Build arm-unknown-linux-gnueabihf
with cross for those (cross.toml in the source).
EOF
    ;;
    x86_64-*) cat <<EOF
edgenode $version for x86-64 Linux, statically linked (musl): mini PCs, VMs,
testing. Any distribution and version.  uname -m  prints x86_64.
EOF
    ;;
  esac
  cat <<EOF

Contents
  edgenode                 the server (stripped)
  systemd/edgenode.service the service unit (runs as a dynamic user, state in
                           /var/lib/edgenode)
  systemd/edgenode.socket  optional socket activation
  edgenode.toml.example    every setting, with its default, commented out
  completions/             shell completions: edgenode.bash, _edgenode (zsh),
                           edgenode.fish
  man/edgenode.1           the man page (man ./man/edgenode.1)
  install.sh               installs all of the above (when present)
  LICENSE                  edgenode's licence (MIT)
  licenses/sled/           the licences of the sled database compiled into the
                           binary (MIT or Apache-2.0, at your option)

Install (on the board)
  sha256sum -c SHA256SUMS --ignore-missing     # next to the downloaded tarball
  tar xzf $name.tar.gz
  cd $name
  ./edgenode --version
  sudo ./install.sh --no-start
  sudoedit /etc/edgenode/edgenode.toml         # listen, redis_url, ...
  sudo systemctl start edgenode
  curl -s http://127.0.0.1:8080/api/ready      # {"ready":true}

install.sh copies the binary to /usr/local/bin, the units to
/etc/systemd/system and the example to /etc/edgenode/edgenode.toml (never
overwriting an existing one), then enables the service; see ./install.sh --help
(upgrade: run the new release's install.sh; remove: --uninstall).
Secrets (api_token, a redis_url with a password) go in /etc/edgenode/edgenode.env
(root, 0600) as EDGENODE_API_TOKEN=... and EDGENODE_REDIS_URL=...

Without install.sh, by hand:
  sudo install -m 0755 edgenode /usr/local/bin/edgenode
  sudo install -m 0644 systemd/edgenode.service systemd/edgenode.socket /etc/systemd/system/
  sudo install -d /etc/edgenode
  sudo install -m 0644 edgenode.toml.example /etc/edgenode/edgenode.toml
  sudo systemctl daemon-reload
  sudo systemctl enable --now edgenode
EOF
}

mkdir -p dist
# Reproducible archives: fixed owner, order and times (the commit's time).
mtime=$(git log -1 --format=%ct 2>/dev/null || echo 0)
for t in "${targets[@]}"; do
  name=edgenode-$version-$t
  dir=$stage_root/pkg/$name
  mkdir -p "$dir/systemd"
  install -m 0755 "$stage_root/$t/edgenode" "$dir/edgenode"
  install -m 0644 systemd/edgenode.service systemd/edgenode.socket "$dir/systemd/"
  # install.sh expects the example and itself next to the binary.
  install -m 0644 deploy/edgenode.toml.example "$dir/edgenode.toml.example"
  install -D -m 0644 -t "$dir/completions" "$docs_dir"/completions/*
  install -D -m 0644 -t "$dir/man" "$docs_dir/man/edgenode.1"
  [ ! -f deploy/install.sh ] || install -m 0755 deploy/install.sh "$dir/install.sh"
  readme "$t" "$name" >"$dir/README"
  chmod 0644 "$dir/README"
  # The licences: edgenode's, and those of the sled fork linked into the binary.
  install -m 0644 LICENSE "$dir/LICENSE"
  install -D -m 0644 -t "$dir/licenses/sled" vendor/sled/LICENSE-MIT vendor/sled/LICENSE-APACHE
  tar -C "$stage_root/pkg" --sort=name --owner=0 --group=0 --numeric-owner \
      --mtime="@$mtime" -cf - "$name" | gzip -9n >"dist/$name.tar.gz"
  echo "release.sh: dist/$name.tar.gz"
done
# The sums cover every tarball of this version in dist/, not only this run's.
(cd dist && sha256sum "edgenode-$version-"*.tar.gz >SHA256SUMS)
echo "release.sh: dist/SHA256SUMS"
cat dist/SHA256SUMS
