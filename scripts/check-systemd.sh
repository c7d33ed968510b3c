#!/usr/bin/env bash
# Checks systemd/edgenode.service and systemd/edgenode.socket without a running
# systemd (works as root in a container whose PID 1 is not systemd):
#
#   1. `systemd-analyze verify` on both units, exactly as shipped;
#   2. `systemd-analyze security --offline=true` on the service: the overall
#      exposure level must be <= MAX_EXPOSURE (default 2.5);
#   3. the directives docs/operations.md promises are present.
#
# Usage: scripts/check-systemd.sh [EDGENODE_BINARY]
#   EDGENODE_BINARY: an executable to stand in for /usr/local/bin/edgenode
#   (default: $CARGO_TARGET_DIR or target/release/edgenode if built, else
#   /bin/true). verify only checks that ExecStart= names an executable file; it
#   never runs it, so /bin/true is enough.
#
# Exit status: 0 if every check passed, 1 otherwise. Needs systemd >= 250
# (Debian 12 has 252); installs Debian's `systemd` package if systemd-analyze
# is missing (needs root).
set -euo pipefail

MAX_EXPOSURE="${MAX_EXPOSURE:-2.5}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
service_src="$repo/systemd/edgenode.service"
socket_src="$repo/systemd/edgenode.socket"
failures=0
passes=0

pass() { printf 'PASS: %s\n' "$*"; passes=$((passes + 1)); }
fail() { printf 'FAIL: %s\n' "$*"; failures=$((failures + 1)); }
die()  { printf 'FAIL: %s\n' "$*"; exit 1; }

for f in "$service_src" "$socket_src"; do
    [[ -f $f ]] || die "missing unit file $f"
done

# --- systemd-analyze ----------------------------------------------------------
if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "systemd-analyze not found; installing Debian's systemd package"
    command -v apt-get >/dev/null 2>&1 || die "systemd-analyze missing and no apt-get to install it"
    [[ $(id -u) -eq 0 ]] || die "systemd-analyze missing; run as root to install it (apt-get install systemd)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Installing systemd in a container without systemd as PID 1 is fine: its
    # maintainer scripts skip what needs a running manager.
    apt-get install -y -qq --no-install-recommends systemd >/dev/null
    command -v systemd-analyze >/dev/null 2>&1 || die "systemd-analyze still missing after installing systemd"
fi
sd_version="$(systemd-analyze --version | awk 'NR == 1 { print $2; exit }')"
[[ $sd_version =~ ^[0-9]+$ ]] || die "cannot read systemd version from 'systemd-analyze --version'"
# --offline (security on a unit file, no manager needed) and verify --root
# appeared in systemd 250.
(( sd_version >= 250 )) || die "systemd $sd_version is too old: need >= 250 for security --offline and verify --root"
echo "using systemd-analyze from systemd $sd_version"

# --- binary that stands in for /usr/local/bin/edgenode --------------------------
if [[ $# -ge 1 ]]; then
    binary="$1"
    [[ -f $binary && -x $binary ]] || die "$binary is not an executable file"
elif [[ -x "${CARGO_TARGET_DIR:-$repo/target}/release/edgenode" ]]; then
    binary="${CARGO_TARGET_DIR:-$repo/target}/release/edgenode"
else
    binary=/bin/true
fi
echo "standing in for /usr/local/bin/edgenode: $binary"

# --- a throw-away root ------------------------------------------------------------
# verify fails when ExecStart= is not an executable file, and a test machine has
# no /usr/local/bin/edgenode. Rather than rewriting ExecStart= in a copy (which
# would verify a different text from the one shipped), we build a small root
# directory and run `verify --root=`: systemd then resolves every path, ExecStart=
# included, inside it. It holds:
#   - the two units, copied byte for byte into etc/systemd/system;
#   - the stand-in binary at usr/local/bin/edgenode (a copy: an absolute symlink
#     would be resolved inside the root and dangle);
#   - a copy of the host's system units (/usr/lib/systemd/system, under 1 MB), so
#     that the default dependencies (sysinit.target, sockets.target, ...) and
#     network-online.target resolve. Nothing from the host's /etc/systemd is
#     copied, so local units cannot make the result differ between machines.
root="$(mktemp -d "${TMPDIR:-/tmp}/edgenode-systemd.XXXXXX")"
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/etc/systemd/system" "$root/usr/local/bin" "$root/usr/lib/systemd"
cp "$service_src" "$socket_src" "$root/etc/systemd/system/"
cp "$binary" "$root/usr/local/bin/edgenode"
chmod 0755 "$root/usr/local/bin/edgenode"
# ExecReload= runs /bin/sh (dash, Essential on every Debian): the host's.
mkdir -p "$root/usr/bin"
cp "$(readlink -f /bin/sh)" "$root/usr/bin/sh"
for d in /usr/lib/systemd/system /lib/systemd/system; do
    if [[ -d $d ]]; then
        cp -a "$d" "$root/usr/lib/systemd/"
        break
    fi
done
[[ -d $root/usr/lib/systemd/system ]] || die "no system unit directory (/usr/lib/systemd/system) on this host"
# Debian 12 is merged-/usr; give the root the same /lib, /bin, /sbin links.
for l in lib bin sbin; do
    [[ -e $root/$l ]] || ln -s "usr/$l" "$root/$l"
done

# --- 1. systemd-analyze verify -----------------------------------------------------
# What verify prints and what it means:
#   - a missing ExecStart= binary, a Requires= on an absent unit or an unloadable
#     unit: non-zero exit (a real error);
#   - "Unknown key", "Failed to parse ...", "... ignoring" about our own files:
#     only a warning, exit status 0 -- but it means a directive has no effect, so
#     we fail on any output line that names edgenode.service/edgenode.socket;
#   - lines about other units pulled in as dependencies ("Unit hwclock.service
#     is masked", "foo.service:3: Unknown key ...", "Command /sbin/quotaon is not
#     executable"...): noise we do not own, shown but ignored.
# --recursive-errors=one makes the exit status reflect our units and their
# direct dependencies only: with the default (yes) a broken Requires= anywhere in
# the distribution's dependency tree fails verify without naming any unit; with
# "no", a Requires= of ours on a unit that does not exist passes unnoticed.
# --man=no skips checking Documentation= man pages (no man-db in CI).
# On Debian 12 (systemd 252) in a container, verify of these units prints nothing.
verify_out="$root/verify.out"
set +e
SYSTEMD_LOG_COLOR=0 SYSTEMD_PAGER=cat \
    systemd-analyze verify --root="$root" --man=no --recursive-errors=one \
    /etc/systemd/system/edgenode.service /etc/systemd/system/edgenode.socket \
    >"$verify_out" 2>&1
verify_rc=$?
set -e
own_lines="$(grep -E 'edgenode\.(service|socket)' "$verify_out" || true)"
other_lines="$(grep -vE 'edgenode\.(service|socket)' "$verify_out" || true)"
if [[ -n $other_lines ]]; then
    echo "note: verify output about other units (ignored):"
    sed 's/^/    /' <<<"$other_lines"
fi
if [[ $verify_rc -ne 0 || -n $own_lines ]]; then
    [[ -n $own_lines ]] && sed 's/^/    /' <<<"$own_lines"
    fail "systemd-analyze verify edgenode.service edgenode.socket (exit $verify_rc)"
else
    pass "systemd-analyze verify edgenode.service edgenode.socket"
fi

# --- 2. systemd-analyze security --------------------------------------------------
# --offline=true reads the unit file instead of asking a running manager. The
# last line is "→ Overall exposure level for edgenode.service: 1.0 OK 🙂".
security_out="$root/security.out"
set +e
SYSTEMD_LOG_COLOR=0 SYSTEMD_PAGER=cat SYSTEMD_COLORS=0 \
    systemd-analyze security --offline=true --root="$root" --no-pager \
    /etc/systemd/system/edgenode.service >"$security_out" 2>&1
security_rc=$?
set -e
exposure="$(sed -n 's/.*Overall exposure level for edgenode\.service: *\([0-9][0-9]*\(\.[0-9]*\)\{0,1\}\).*/\1/p' "$security_out" | tail -n 1)"
if [[ -z $exposure ]]; then
    cat "$security_out"
    fail "systemd-analyze security: no 'Overall exposure level' in its output (exit $security_rc)"
elif awk -v e="$exposure" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(e + 0 <= m + 0) }'; then
    pass "systemd-analyze security: exposure level $exposure <= $MAX_EXPOSURE"
else
    # Show what costs points (the lines marked ✗) to make the fix obvious.
    grep -F '✗' "$security_out" || true
    fail "systemd-analyze security: exposure level $exposure > $MAX_EXPOSURE"
fi

# --- 3. directives the operations guide (docs/operations.md) relies on ----------------------------------
# A directive deleted or misspelt still verifies (see above) or only adds a little
# exposure; these are the ones the design names, so check them by text.
# Each entry: file|extended regex that one line must match.
required=(
    "$service_src|^Type=notify$"
    "$service_src|^NotifyAccess=main$"
    "$service_src|^ExecStart=/usr/local/bin/edgenode( |$)"
    "$service_src|^ExecReload=/bin/sh -c 'kill -HUP \\\$\\{MAINPID\\}'$"
    "$service_src|^WatchdogSec=[1-9]"
    "$service_src|^Restart=on-failure$"
    "$service_src|^DynamicUser=yes$"
    "$service_src|^StateDirectory=edgenode$"
    "$service_src|^ProtectSystem=strict$"
    "$service_src|^NoNewPrivileges=yes$"
    "$service_src|^CapabilityBoundingSet=$"
    "$service_src|^SystemCallFilter=@system-service$"
    "$service_src|^RestrictAddressFamilies=.*AF_UNIX"
    "$service_src|^MemoryMax=[0-9]"
    "$socket_src|^ListenStream=."
    "$socket_src|^Service=edgenode\.service$"
)
missing=0
for entry in "${required[@]}"; do
    file="${entry%%|*}"
    re="${entry#*|}"
    if ! grep -Eq -- "$re" "$file"; then
        echo "    $(basename "$file"): no line matching /$re/"
        missing=$((missing + 1))
    fi
done
if [[ $missing -eq 0 ]]; then
    pass "required directives present (${#required[@]} checked)"
else
    fail "$missing required directive(s) missing"
fi

echo
if [[ $failures -eq 0 ]]; then
    echo "PASS: systemd units (exposure $exposure)"
else
    echo "FAIL: systemd units: $failures check(s) failed"
fi
# Last, a closing line CI runners recognise: "checks: N passed, N failed".
echo "checks: $passes passed, $failures failed"
[[ $failures -eq 0 ]]
