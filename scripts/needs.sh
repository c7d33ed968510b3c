# shellcheck shell=bash
# What building, testing and releasing edgenode needs from the system: one
# list, sourced by scripts/doctor.sh (reports), scripts/test.sh,
# scripts/release.sh and scripts/bench.sh (install what is missing).
#
# Each need is detected by a file it provides (a header, a library, a binary's
# path), never by a command name: a command can be there while the package
# the build needs is not. aarch64-linux-gnu-gcc, for one, only recommends the
# arm64 C headers that compiling mimalloc for aarch64 needs, so with
# --no-install-recommends the compiler is there and the build still fails.
#
# One need per line:  GROUPS  FILE  PROVIDER
#   GROUPS    comma-separated:
#               host         any build on this machine (the host C toolchain)
#               test         scripts/test.sh, on top of host and the two ARM targets
#               bench        scripts/bench.sh
#               containers   the image part of tests/containers.rs (optional:
#                            scripts/test.sh does not install it; without
#                            podman or docker that part is skipped)
#               <triple>     building, stripping and running that release target
#   FILE      an absolute path; @SYSROOT@ is the Rust toolchain's sysroot
#             (`rustc --print sysroot`)
#   PROVIDER  a Debian package, or rustup-target:T / rustup-component:C
NEEDS_LIST='
host                           /usr/bin/gcc                                            gcc
host                           /usr/include/stdio.h                                    libc6-dev
test                           /usr/bin/redis-server                                   redis-server
test                           /usr/bin/redis-sentinel                                 redis-sentinel
test                           /usr/bin/redis-cli                                      redis-tools
test                           /usr/sbin/nginx                                         nginx
test                           /usr/sbin/haproxy                                       haproxy
test                           /usr/bin/openssl                                        openssl
test                           /usr/bin/curl                                           curl
test                           /usr/bin/prometheus                                     prometheus
test                           /usr/bin/promtool                                       prometheus
test                           /sbin/ip                                                iproute2
test                           /usr/sbin/iptables                                      iptables
test                           /usr/bin/systemd-analyze                                systemd
test                           /usr/sbin/fsfreeze                                      util-linux
test                           /usr/sbin/mkfs.ext4                                     e2fsprogs
test                           /usr/sbin/debootstrap                                   debootstrap
test                           /usr/bin/systemd-nspawn                                 systemd-container
test                           @SYSROOT@/bin/cargo-clippy                              rustup-component:clippy
test                           @SYSROOT@/bin/rustfmt                                   rustup-component:rustfmt
bench                          /usr/bin/redis-server                                   redis-server
bench                          /usr/bin/redis-benchmark                                redis-tools
bench                          /usr/bin/wrk                                            wrk
bench                          /usr/bin/strace                                         strace
containers                     /usr/bin/podman                                         podman
containers                     @SYSROOT@/lib/rustlib/x86_64-unknown-linux-musl/lib     rustup-target:x86_64-unknown-linux-musl
aarch64-unknown-linux-musl     /usr/bin/aarch64-linux-gnu-gcc                          gcc-aarch64-linux-gnu
aarch64-unknown-linux-musl     /usr/aarch64-linux-gnu/include/bits/libc-header-start.h libc6-dev-arm64-cross
aarch64-unknown-linux-musl     /usr/bin/aarch64-linux-gnu-strip                        binutils-aarch64-linux-gnu
aarch64-unknown-linux-musl     /usr/bin/qemu-aarch64-static                            qemu-user-static
aarch64-unknown-linux-musl     @SYSROOT@/lib/rustlib/aarch64-unknown-linux-musl/lib    rustup-target:aarch64-unknown-linux-musl
armv7-unknown-linux-gnueabihf  /usr/bin/arm-linux-gnueabihf-gcc                        gcc-arm-linux-gnueabihf
armv7-unknown-linux-gnueabihf  /usr/arm-linux-gnueabihf/lib/libc.so                    libc6-dev-armhf-cross
armv7-unknown-linux-gnueabihf  /usr/arm-linux-gnueabihf/lib/ld-linux-armhf.so.3        libc6-armhf-cross
armv7-unknown-linux-gnueabihf  /usr/bin/arm-linux-gnueabihf-objdump                    binutils-arm-linux-gnueabihf
armv7-unknown-linux-gnueabihf  /usr/bin/qemu-arm-static                                qemu-user-static
armv7-unknown-linux-gnueabihf  @SYSROOT@/lib/rustlib/armv7-unknown-linux-gnueabihf/lib rustup-target:armv7-unknown-linux-gnueabihf
x86_64-unknown-linux-musl      /usr/bin/strip                                          binutils
x86_64-unknown-linux-musl      @SYSROOT@/lib/rustlib/x86_64-unknown-linux-musl/lib     rustup-target:x86_64-unknown-linux-musl
'

# The groups scripts/test.sh needs (its ARM tests build those two releases).
# shellcheck disable=SC2034 # used by the scripts that source this file
NEEDS_TEST_GROUPS=(host test aarch64-unknown-linux-musl armv7-unknown-linux-gnueabihf)

_needs_sysroot=""
# Prints "FILE PROVIDER" for every need of the given groups whose file is
# missing, each provider's file once. Without rustc (no Rust toolchain yet)
# prints a "rustc rustup" line instead of the @SYSROOT@ needs.
needs_missing() {
  local groups file provider g seen=" " no_rust=0
  if [ -z "$_needs_sysroot" ]; then
    _needs_sysroot=$(rustc --print sysroot 2>/dev/null) || _needs_sysroot=""
  fi
  while read -r groups file provider; do
    [ -n "$groups" ] || continue
    for g in "$@"; do
      [[ ",$groups," == *",$g,"* ]] || continue
      if [[ $file == @SYSROOT@* ]]; then
        if [ -z "$_needs_sysroot" ]; then no_rust=1; break; fi
        file=$_needs_sysroot${file#@SYSROOT@}
      fi
      [[ $seen == *" $file "* ]] && break
      seen+="$file "
      [ -e "$file" ] || echo "$file $provider"
      break
    done
  done <<<"$NEEDS_LIST"
  if [ "$no_rust" = 1 ]; then echo "rustc rustup"; fi
}

# Installs what needs_missing reports for the given groups: Debian packages with
# apt-get (as root, or with sudo), Rust targets and components with rustup.
# Then checks again and fails, naming each file, if anything is still missing.
# $NEEDS_WHO (the calling script's name) prefixes the messages.
needs_install() {
  local who=${NEEDS_WHO:-needs} file provider sudo=""
  local -a apt=() targets=() components=()
  while read -r file provider; do
    [ -n "$file" ] || continue
    case $provider in
      rustup) echo "$who: no Rust toolchain (rustc): install rustup from https://rustup.rs" >&2; return 1 ;;
      rustup-target:*) targets+=("${provider#rustup-target:}") ;;
      rustup-component:*) components+=("${provider#rustup-component:}") ;;
      *) [[ " ${apt[*]} " == *" $provider "* ]] || apt+=("$provider") ;;
    esac
  done < <(needs_missing "$@")
  if [ ${#apt[@]} -gt 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
      echo "$who: missing Debian packages and no apt-get (not Debian?): ${apt[*]}" >&2
      return 1
    fi
    if [ "$(id -u)" -ne 0 ]; then
      if ! command -v sudo >/dev/null 2>&1; then
        echo "$who: missing ${apt[*]}; run as root or install sudo (bash scripts/doctor.sh lists why)" >&2
        return 1
      fi
      sudo=sudo
    fi
    echo "$who: installing ${apt[*]}"
    $sudo apt-get update -qq || return 1
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt[@]}" >/dev/null || return 1
  fi
  if [ ${#targets[@]} -gt 0 ] || [ ${#components[@]} -gt 0 ]; then
    if ! command -v rustup >/dev/null 2>&1; then
      echo "$who: rustup is needed to add ${targets[*]} ${components[*]}" >&2
      return 1
    fi
    if [ ${#targets[@]} -gt 0 ]; then rustup target add "${targets[@]}" || return 1; fi
    if [ ${#components[@]} -gt 0 ]; then rustup component add "${components[@]}" || return 1; fi
  fi
  local still
  still=$(needs_missing "$@")
  if [ -n "$still" ]; then
    echo "$who: still missing after installing (file, provided by):" >&2
    printf '  %s\n' "${still//$'\n'/$'\n'  }" >&2
    return 1
  fi
}
