#!/bin/sh
# install.sh — install (or remove) an unpacked edgenode release on this machine.
#
#   sudo ./install.sh [--socket] [--no-start]        install or upgrade
#   sudo ./install.sh --uninstall [--purge]          remove
#   ./install.sh --root DIR [...]                    install into DIR, no systemctl
#
# Run it from the unpacked release tarball, which holds:
#   edgenode                   the binary            -> /usr/local/bin/edgenode
#   edgenode.toml.example      example config        -> /etc/edgenode/edgenode.toml.example
#                                                       and, only if absent,
#                                                       /etc/edgenode/edgenode.toml
#   (created if absent)        secrets, root 0600    -> /etc/edgenode/edgenode.env
#   systemd/edgenode.service   service unit          -> /etc/systemd/system/
#   systemd/edgenode.socket    socket unit           -> /etc/systemd/system/
# then: systemctl daemon-reload; systemctl enable --now edgenode.service.
#
# Idempotent: running it again changes nothing; running the script of a newer
# release upgrades — files that differ are replaced atomically and a running
# service is restarted once. The config file is never overwritten.
#
# Options:
#   --src DIR     where the release files are (default: this script's
#                 directory, or its parent if the binary is there)
#   --root DIR    install below DIR instead of / (like DESTDIR, which is also
#                 honoured); systemctl is skipped. For tests and image builds.
#   --socket      also enable socket activation (edgenode.socket): systemd
#                 owns the port, restarts refuse no connection; the listen
#                 address then comes from the socket unit
#                 (systemctl edit edgenode.socket), not from edgenode.toml
#   --no-start    enable but do not start (edit the config first)
#   --uninstall   stop and disable the units, remove them and the binary; keeps
#                 /etc/edgenode and the state directory (/var/lib/edgenode)
#   --purge       with --uninstall: also remove /etc/edgenode and the state
#                 directory — all sessions stored on this node are lost
#   -h, --help
#
# systemctl is skipped (and what was skipped is printed) when --root/DESTDIR
# is given, when systemctl is not installed, or when the machine was not
# booted with systemd (no /run/systemd/system, e.g. in a container). On such
# a machine nothing starts edgenode: the script says so and prints the
# command that runs it by hand.
set -eu

prog=${0##*/}
say() { echo "$prog: $*"; }
warn() { echo "$prog: warning: $*" >&2; }
die() { echo "$prog: error: $*" >&2; exit 1; }

usage() { sed -n '2,/^set -eu/{/^set -eu/d;s/^# \{0,1\}//;p}' "$0"; }

src=
root=${DESTDIR:-}
mode=install
purge=0
socket=0
start=1
while [ $# -gt 0 ]; do
    case $1 in
        --src) [ $# -ge 2 ] || die "--src needs a directory"; src=$2; shift ;;
        --src=*) src=${1#*=} ;;
        --root|--prefix|--destdir) [ $# -ge 2 ] || die "$1 needs a directory"; root=$2; shift ;;
        --root=*|--prefix=*|--destdir=*) root=${1#*=} ;;
        --uninstall) mode=uninstall ;;
        --purge) purge=1 ;;
        --socket) socket=1 ;;
        --no-start) start=0 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
done
[ "$purge" = 0 ] || [ "$mode" = uninstall ] || die "--purge only goes with --uninstall"

# ---- where things go --------------------------------------------------------
if [ -n "$root" ]; then
    mkdir -p "$root"
    root=$(cd "$root" && pwd)
    [ "$root" != / ] || root=
fi
BINDIR=$root/usr/local/bin
CONFDIR=$root/etc/edgenode
UNITDIR=$root/etc/systemd/system
# StateDirectory=edgenode with DynamicUser=yes lives in /var/lib/private/edgenode
# behind the /var/lib/edgenode symlink; remove both on --purge.
STATEDIRS="$root/var/lib/edgenode $root/var/lib/private/edgenode"

if [ -z "$root" ] && [ "$(id -u)" != 0 ]; then
    die "run as root (sudo $0 ...) or install into a directory with --root DIR"
fi

# ---- systemctl, or say what is skipped -----------------------------------------
use_systemd=1
why_not=
if [ -n "$root" ]; then
    use_systemd=0; why_not="--root $root"
elif ! command -v systemctl >/dev/null 2>&1; then
    use_systemd=0; why_not="systemctl not installed"
elif [ ! -d /run/systemd/system ]; then
    use_systemd=0; why_not="not booted with systemd"
fi

sysctl() {
    if [ "$use_systemd" = 1 ]; then
        say "systemctl $*"
        systemctl "$@"
    else
        say "skipped ($why_not): systemctl $*"
    fi
}

# ---- helpers -------------------------------------------------------------------
changed=0

# put_file SRC DEST MODE: copy unless identical; atomic rename (a running
# binary can be replaced); sets changed=1 when something was written.
put_file() {
    if [ -f "$2" ] && cmp -s "$1" "$2"; then
        say "unchanged  $2"
        return 0
    fi
    verb=installed
    [ ! -e "$2" ] || verb=updated
    mkdir -p "$(dirname -- "$2")"
    tmp="$2.new.$$"
    cp "$1" "$tmp"
    chmod "$3" "$tmp"
    mv -f "$tmp" "$2"
    say "$verb  $2"
    changed=1
}

remove() {
    for f in "$@"; do
        if [ -e "$f" ] || [ -L "$f" ]; then
            rm -rf -- "$f"
            say "removed    $f"
        fi
    done
}

# ---- uninstall -----------------------------------------------------------------------
if [ "$mode" = uninstall ]; then
    if [ "$use_systemd" = 1 ]; then
        for u in edgenode.socket edgenode.service; do
            if systemctl cat "$u" >/dev/null 2>&1; then
                sysctl disable --now "$u" || warn "could not stop/disable $u"
            fi
        done
    else
        sysctl disable --now edgenode.socket edgenode.service
    fi
    remove "$UNITDIR/edgenode.service" "$UNITDIR/edgenode.socket" \
           "$UNITDIR/edgenode.service.d" "$UNITDIR/edgenode.socket.d"
    sysctl daemon-reload
    if [ "$use_systemd" = 1 ]; then
        systemctl reset-failed edgenode.service edgenode.socket >/dev/null 2>&1 || true
    fi
    remove "$BINDIR/edgenode"
    if [ "$purge" = 1 ]; then
        # shellcheck disable=SC2086 # word splitting of STATEDIRS is intended
        remove "$CONFDIR" $STATEDIRS
        say "purged configuration and stored sessions"
    else
        say "kept $CONFDIR and the state directory (use --purge to remove them)"
    fi
    say "edgenode uninstalled"
    if [ -z "$root" ] && [ "$use_systemd" = 0 ]; then
        say "($why_not: an edgenode you started by hand is still running until you stop it)"
    fi
    exit 0
fi

# ---- install -------------------------------------------------------------------------
if [ -z "$src" ]; then
    src=$(cd "$(dirname -- "$0")" && pwd)
    if [ ! -f "$src/edgenode" ] && [ -f "$src/../edgenode" ]; then
        src=$(cd "$src/.." && pwd)
    fi
fi
[ -d "$src" ] || die "release directory not found: $src"
[ -f "$src/edgenode" ] || die "no edgenode binary in $src (use --src DIR)"
[ -f "$src/systemd/edgenode.service" ] || die "no systemd/edgenode.service in $src"

# A binary for another CPU fails here rather than as a crash-looping service.
if [ -z "$root" ]; then
    if ! "$src/edgenode" --version >/dev/null 2>&1; then
        die "$src/edgenode does not run on this machine ($(uname -m)): wrong release tarball for this architecture?"
    fi
    say "release: $("$src/edgenode" --version 2>/dev/null | head -n 1)"
fi

was_active=0
if [ "$use_systemd" = 1 ] && systemctl is-active --quiet edgenode.service 2>/dev/null; then
    was_active=1
fi

put_file "$src/edgenode" "$BINDIR/edgenode" 0755
put_file "$src/systemd/edgenode.service" "$UNITDIR/edgenode.service" 0644
if [ -f "$src/systemd/edgenode.socket" ]; then
    put_file "$src/systemd/edgenode.socket" "$UNITDIR/edgenode.socket" 0644
elif [ "$socket" = 1 ]; then
    die "--socket given but the release has no systemd/edgenode.socket"
fi

if [ -f "$src/edgenode.toml.example" ]; then
    c_before=$changed
    put_file "$src/edgenode.toml.example" "$CONFDIR/edgenode.toml.example" 0644
    changed=$c_before   # a new example alone needs no restart
    if [ -e "$CONFDIR/edgenode.toml" ]; then
        say "kept       $CONFDIR/edgenode.toml (never overwritten)"
    else
        # The file will hold api_token and the Redis URL. If the unit hands it
        # to the service as a systemd credential (LoadCredential=), only root
        # needs to read it; otherwise the DynamicUser service reads it directly
        # and it must be world-readable.
        if grep -q '^LoadCredential.*edgenode\.toml' "$UNITDIR/edgenode.service"; then
            cmode=0600
        else
            cmode=0644
        fi
        mkdir -p "$CONFDIR"
        cp "$src/edgenode.toml.example" "$CONFDIR/edgenode.toml.new.$$"
        chmod "$cmode" "$CONFDIR/edgenode.toml.new.$$"
        mv -f "$CONFDIR/edgenode.toml.new.$$" "$CONFDIR/edgenode.toml"
        if [ "$use_systemd" = 1 ]; then
            say "installed  $CONFDIR/edgenode.toml (mode $cmode) — edit it, then: systemctl restart edgenode"
        else
            say "installed  $CONFDIR/edgenode.toml (mode $cmode) — edit it"
        fi
    fi
else
    warn "no edgenode.toml.example in $src; $CONFDIR/edgenode.toml not created"
fi

# Secrets (EDGENODE_API_TOKEN, a Redis URL with a password) go in this file,
# which systemd reads as root (EnvironmentFile=) — edgenode.toml is
# world-readable. Created once, commented out; never overwritten.
if [ ! -e "$CONFDIR/edgenode.env" ]; then
    mkdir -p "$CONFDIR"
    umask_old=$(umask)
    umask 077
    cat >"$CONFDIR/edgenode.env.new.$$" <<'ENV'
# edgenode secrets: read by systemd (as root) and passed to edgenode as
# environment; they override edgenode.toml. Keep this file root:root 0600.
# The api token must be the same on every node of a cluster:
#   openssl rand -hex 32
#EDGENODE_API_TOKEN=
#EDGENODE_REDIS_URL=redis://:PASSWORD@10.0.0.10:6379/0
ENV
    umask "$umask_old"
    chmod 0600 "$CONFDIR/edgenode.env.new.$$"
    mv -f "$CONFDIR/edgenode.env.new.$$" "$CONFDIR/edgenode.env"
    say "installed  $CONFDIR/edgenode.env (mode 0600, for secrets)"
else
    # Kept as it is, but never left readable by others: it holds secrets.
    mode=$(stat -c %a "$CONFDIR/edgenode.env")
    if [ "$mode" != "600" ] && [ "$mode" != "400" ]; then
        chmod 0600 "$CONFDIR/edgenode.env"
        say "kept       $CONFDIR/edgenode.env (never overwritten; its mode was $mode, now 0600: it holds secrets)"
    else
        say "kept       $CONFDIR/edgenode.env (never overwritten)"
    fi
fi

sysctl daemon-reload
if [ "$socket" = 1 ]; then
    units="edgenode.socket edgenode.service"
else
    units=edgenode.service
fi
# shellcheck disable=SC2086 # word splitting of $units is intended
if [ "$start" = 1 ]; then
    sysctl enable --now $units
else
    sysctl enable $units
fi
# An upgrade of a running service: restart once so the new binary/unit is used.
if [ "$changed" = 1 ] && [ "$was_active" = 1 ] && [ "$start" = 1 ]; then
    sysctl restart edgenode.service
fi

if [ "$use_systemd" = 1 ] && [ "$start" = 1 ]; then
    if [ "$socket" = 1 ]; then
        systemctl --no-pager --lines=0 status edgenode.socket || true
    else
        systemctl --no-pager --lines=0 status edgenode.service || true
    fi
fi
if [ -n "$root" ]; then
    say "edgenode installed into $root"
elif [ "$use_systemd" = 0 ]; then
    # Nothing on this machine will run edgenode: say so, and how to run it.
    datadir=/var/lib/edgenode
    say "edgenode is installed but NOT running: $why_not, so no service was"
    say "enabled or started, and nothing starts edgenode at boot."
    if [ "$socket" = 1 ]; then
        say "(--socket needs systemd: edgenode binds 'listen' from $CONFDIR/edgenode.toml itself.)"
    fi
    say "Run it by hand, in the foreground (logs on stderr; SIGTERM or Ctrl-C drains and stops it),"
    say "with the secrets of $CONFDIR/edgenode.env as systemd would pass them:"
    say ""
    say "  mkdir -p -m 0700 $datadir"
    say "  sh -c 'set -a; . $CONFDIR/edgenode.env; exec $BINDIR/edgenode --config $CONFDIR/edgenode.toml --data-dir $datadir'"
    say ""
    say "or have your init system or supervisor (OpenRC, runit, s6, a container's"
    say "entrypoint) run that command. It needs no root: any user that owns $datadir"
    say "and can read $CONFDIR/edgenode.env will do."
else
    if [ "$start" = 1 ]; then
        say "edgenode installed and running"
    else
        say "edgenode installed and enabled, not started (--no-start): edit $CONFDIR/edgenode.toml, then: systemctl start edgenode"
    fi
fi
