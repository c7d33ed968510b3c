#!/usr/bin/env bash
# Builds (once) a minimal Debian bookworm root file system of the host's
# architecture that systemd-nspawn can boot with systemd as PID 1, for
# tests/systemd_nspawn.rs. The tree is cached: a second call with the same
# directory returns at once.
#
#   scripts/nspawn-rootfs.sh ROOTFS
#
# ROOTFS is complete only when ROOTFS/.edgenode-rootfs holds this script's
# recipe line (written after debootstrap succeeded; the tree is built in
# ROOTFS.partial and renamed). A tree built from another recipe is rebuilt.
# Nothing in it is ever booted: the test boots copies.
#
# The mirror is the one apt on this machine uses for bookworm (from
# /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list), unless
# EDGENODE_DEBIAN_MIRROR is set; debootstrap's own default otherwise.
#
# Progress goes to stderr. Exit status: 0 ready; 77 cannot run here (the
# reason is printed on stdout, on a line starting "SKIP:"): not root, debootstrap or systemd-nspawn missing, the
# mirror unreachable or too slow, nspawn refused to start a container;
# anything else is a failure (the reason is printed).
set -euo pipefail

SUITE=bookworm
# systemd-sysv provides /sbin/init; curl is the probe's HTTP client.
INCLUDE=systemd,systemd-sysv,curl
# Bounded when the tree is not cached: a bookworm minbase takes about a minute.
DEBOOTSTRAP_TIMEOUT=${DEBOOTSTRAP_TIMEOUT:-420}

skip() { echo "SKIP: $*"; exit 77; }
die() { echo "FAIL: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 ROOTFS"
rootfs=$1

[ "$(id -u)" -eq 0 ] || skip "debootstrap and systemd-nspawn need root"
[ -x /usr/sbin/debootstrap ] || skip "debootstrap is not installed (apt-get install debootstrap; scripts/test.sh does)"
[ -x /usr/bin/systemd-nspawn ] || skip "systemd-nspawn is not installed (apt-get install systemd-container; scripts/test.sh does)"
command -v dpkg >/dev/null 2>&1 || skip "no dpkg: not a Debian-family host"
arch=$(dpkg --print-architecture)
recipe="debootstrap --variant=minbase --include=$INCLUDE $SUITE $arch (v1)"

# One builder at a time for a given directory (two test binaries, or two
# tests in one binary, may ask at once).
mkdir -p "$(dirname "$rootfs")"
exec 9>"$rootfs.lock"
flock 9

if [ -f "$rootfs/.edgenode-rootfs" ] && [ "$(cat "$rootfs/.edgenode-rootfs")" = "$recipe" ]; then
    echo "rootfs cached: $rootfs ($recipe)"
else
    mirror=${EDGENODE_DEBIAN_MIRROR:-}
    if [ -z "$mirror" ]; then
        # deb822 stanzas: the URIs of a stanza whose Suites has plain "bookworm".
        for f in /etc/apt/sources.list.d/*.sources; do
            [ -f "$f" ] || continue
            mirror=$(awk -v suite="$SUITE" '
                /^[[:space:]]*$/ { if (uri != "" && has) { print uri; exit } uri = ""; has = 0; next }
                tolower($1) == "uris:" { uri = $2 }
                tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == suite) has = 1 }
                END { if (uri != "" && has) print uri }' "$f" | head -n 1)
            [ -z "$mirror" ] || break
        done
    fi
    if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
        mirror=$(awk -v suite="$SUITE" '$1 == "deb" && $3 == suite { print $2; exit }' /etc/apt/sources.list)
    fi
    keyring=()
    if [ -f /usr/share/keyrings/debian-archive-keyring.gpg ]; then
        keyring=(--keyring=/usr/share/keyrings/debian-archive-keyring.gpg)
    fi

    rm -rf "$rootfs" "$rootfs.partial"
    log="$rootfs.debootstrap.log"
    echo "nspawn-rootfs: building $rootfs: $recipe from ${mirror:-the default mirror of debootstrap} (log: $log)" >&2
    started=$SECONDS
    set +e
    timeout -k 10 "$DEBOOTSTRAP_TIMEOUT" /usr/sbin/debootstrap --variant=minbase \
        --include="$INCLUDE" --arch="$arch" "${keyring[@]}" \
        "$SUITE" "$rootfs.partial" ${mirror:+"$mirror"} >"$log" 2>&1
    rc=$?
    set -e
    if [ "$rc" -ne 0 ]; then
        tail -n 15 "$log" | sed 's/^/    /' >&2
        rm -rf "$rootfs.partial"
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
            skip "debootstrap did not finish within ${DEBOOTSTRAP_TIMEOUT}s: the Debian mirror is unreachable or too slow"
        fi
        if grep -qE "Failed getting release file|Couldn't download|Failure trying to run: .*wget|Temporary failure in name resolution|unable to resolve host|Connection refused|Network is unreachable" "$log"; then
            skip "debootstrap could not download from the Debian mirror ${mirror:-(default)}: no network to it"
        fi
        die "debootstrap failed (exit $rc); see $log"
    fi
    # The downloaded .debs are not needed to boot (about 40 MB).
    rm -f "$rootfs.partial"/var/cache/apt/archives/*.deb
    echo "$recipe" >"$rootfs.partial/.edgenode-rootfs"
    mv "$rootfs.partial" "$rootfs"
    echo "nspawn-rootfs: built in $((SECONDS - started))s: $rootfs" >&2
fi

# Can nspawn start a container at all here? (Not booted: the cache stays as
# debootstrap left it.) A refusal is a reason to skip; a later failure to boot
# systemd is a test failure.
if ! out=$(systemd-nspawn --register=no --keep-unit --quiet -D "$rootfs" /bin/true 2>&1); then
    skip "systemd-nspawn refused to start a container: $(echo "$out" | grep -v 'Attempted to remove disk file system' | head -n 3 | tr '\n' ' ')"
fi
