#!/bin/sh
# render.sh — fill in the @KEY@ placeholders of a deploy template.
#
#   deploy/render.sh TEMPLATE OUT KEY=VALUE [KEY=VALUE...]
#
# Every occurrence of @KEY@ in TEMPLATE is replaced by VALUE and the result is
# written to OUT ("-" writes to stdout). KEY is upper-case letters, digits and
# underscores. The script fails (exit 1) and writes nothing if any @KEY@ token
# is left over afterwards, so a template can never be installed half-rendered.
# A KEY=VALUE whose token does not appear in TEMPLATE only prints a warning.
#
# Example (nginx.conf for three nodes, browsers on HTTPS port 443; the
# certificate paths are placeholders like the addresses):
#   deploy/render.sh deploy/nginx.conf /etc/nginx/nginx.conf \
#       NODE1=10.0.0.11:8080 NODE2=10.0.0.12:8080 NODE3=10.0.0.13:8080 \
#       HTTPS_LISTEN=0.0.0.0:443 HTTP_LISTEN=0.0.0.0:80 \
#       TLS_CERT=/etc/ssl/edgenode/fullchain.pem TLS_KEY=/etc/ssl/edgenode/privkey.pem \
#       INTERNAL_LISTEN=10.0.1.5:8088 STATUS_LISTEN=127.0.0.1:8081 \
#       RUNDIR=/run TEMPDIR=/var/lib/nginx LOGDIR=/var/log/nginx
#
# Used by the tests and by operators; POSIX sh + sed only.
set -eu

prog=${0##*/}
die() { echo "$prog: $*" >&2; exit 1; }

[ $# -ge 2 ] || die "usage: $prog TEMPLATE OUT KEY=VALUE..."
template=$1
out=$2
shift 2
[ -f "$template" ] && [ -r "$template" ] || die "template not readable: $template"

# Build one sed script: s|@KEY@|escaped value|g per argument.
script=
nl='
'
for kv in "$@"; do
    case $kv in
        *=*) ;;
        *) die "argument is not KEY=VALUE: $kv" ;;
    esac
    key=${kv%%=*}
    value=${kv#*=}
    case $key in
        ''|*[!A-Z0-9_]*) die "bad key '$key' (use A-Z, 0-9, _)" ;;
    esac
    case $value in
        *"$nl"*) die "value of $key contains a newline" ;;
    esac
    if ! grep -q "@$key@" "$template"; then
        echo "$prog: warning: @$key@ does not occur in $template" >&2
    fi
    # Escape the characters that are special on the right-hand side of s|||:
    # backslash, the delimiter and '&'.
    esc=$(printf '%s\n' "$value" | sed -e 's/[\\|&]/\\&/g')
    script="${script}s|@${key}@|${esc}|g${nl}"
done

final=
tmp=$(mktemp "${TMPDIR:-/tmp}/render.XXXXXX")
trap 'rm -f "$tmp" ${final:+"$final"}' EXIT
trap 'exit 1' HUP INT TERM
if [ -n "$script" ]; then
    sed -e "$script" "$template" >"$tmp"
else
    cat "$template" >"$tmp"
fi

# Refuse to produce output with unfilled placeholders.
if left=$(grep -n -o '@[A-Z0-9_][A-Z0-9_]*@' "$tmp"); then
    echo "$prog: unfilled placeholders in $template:" >&2
    printf '%s\n' "$left" | sed 's/^/  line /' >&2
    exit 1
fi

if [ "$out" = - ]; then
    cat "$tmp"
elif [ -L "$out" ] || { [ -e "$out" ] && [ ! -f "$out" ]; }; then
    # A symlink or a device (/dev/stdout): write through it, don't replace it.
    cat "$tmp" >"$out"
else
    # Write next to OUT and rename, so a running balancer never reads a
    # half-written file.
    outdir=$(dirname -- "$out")
    [ -d "$outdir" ] || die "output directory does not exist: $outdir"
    final=$(mktemp "$outdir/.render.XXXXXX")
    cat "$tmp" >"$final"
    chmod 0644 "$final"
    mv -f "$final" "$out"
fi
