#!/bin/bash
# Runs INSIDE a container booted by tests/systemd_nspawn.rs (systemd-nspawn -b,
# systemd as PID 1), as the oneshot unit edgenode-probe.service, after the host
# installed edgenode into the container with deploy/install.sh --root.
#
#   /probe/probe.sh service    edgenode.service alone (edgenode binds `listen`)
#   /probe/probe.sh socket     edgenode.socket + edgenode.service
#
# It drives systemd and edgenode and records what it saw as KEY=VALUE lines in
# /probe/results (plus raw files under /probe); the test on the host reads
# them after the container powered off and makes the assertions. It judges
# nothing itself, so that a failure is reported by the test with the values.
# The unit powers the container off when this script ends, however it ends.
#
# /probe/install-commands holds the systemctl commands deploy/install.sh would
# have run on a real machine (it printed them as skipped under --root); they
# are run here first, as they are, in order.
set -u

mode=${1:?usage: probe.sh service|socket}
P=/probe
out=$P/results
: >"$out"
port=8080                 # the shipped default: edgenode.toml and edgenode.socket
base=http://127.0.0.1:$port

rec() { printf '%s=%s\n' "$1" "$2" >>"$out"; }
# show PREFIX UNIT PROP...: records PREFIX.PROP=value for each property.
show() {
    local prefix=$1 unit=$2 args=() p
    shift 2
    for p in "$@"; do args+=(-p "$p"); done
    systemctl show "$unit" "${args[@]}" | sed "s/^/$prefix./" >>"$out"
}
prop() { systemctl show "$1" -p "$2" --value; }
# wait_prop UNIT PROP VALUE SECONDS: polls until the property has the value.
wait_prop() {
    local deadline=$((SECONDS + $4))
    while [ "$(prop "$1" "$2")" != "$3" ]; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.05
    done
}
uid_of() { awk '/^Uid:/ { print $2 }' "/proc/$1/status" 2>/dev/null; }
# http METHOD PATH [BODY]: prints "STATUS" and leaves the body in $P/body.
http() {
    local args=(-sS --max-time 10 -o "$P/body" -w '%{http_code}' -X "$1")
    [ $# -lt 3 ] || args+=(-H 'content-type: application/json' --data "$3")
    curl "${args[@]}" "$base$2" 2>>"$P/curl.err"
}
session_id() { sed -n 's/.*"session_id":"\([^"]*\)".*/\1/p' "$P/body"; }

rec mode "$mode"
rec systemd "$(systemctl --version | head -n 1)"
rec virt "$(systemd-detect-virt 2>&1)"
rec binary "$(/usr/local/bin/edgenode --version 2>&1 | head -n 1)"

# --- what install.sh would have run -----------------------------------------------
n=0
while IFS= read -r cmd; do
    [ -n "$cmd" ] || continue
    n=$((n + 1))
    started=$EPOCHREALTIME
    # shellcheck disable=SC2086 # the recorded command is split into words
    $cmd >>"$P/install.log" 2>&1
    rc=$?
    rec "install.$n" "rc=$rc secs=$(awk -v a="$started" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }') $cmd"
done <"$P/install-commands"
rec install.count "$n"

common_props=(ActiveState SubState Result MainPID InvocationID NRestarts StatusText)

if [ "$mode" = service ]; then
    # --- Type=notify reached active; watchdog; ordering ------------------------------
    show start edgenode.service "${common_props[@]}" Type NotifyAccess WatchdogUSec \
        After Wants DynamicUser StateDirectory ExecMainStartTimestampMonotonic
    show timesync time-sync.target ActiveState ActiveEnterTimestampMonotonic
    pid=$(prop edgenode.service MainPID)

    # --- DynamicUser and StateDirectory --------------------------------------------------
    rec main.uid "$(uid_of "$pid")"
    rec main.gid "$(awk '/^Gid:/ { print $2 }' "/proc/$pid/status")"
    rec main.nonewprivs "$(awk '/^NoNewPrivs:/ { print $2 }' "/proc/$pid/status")"
    rec main.capeff "$(awk '/^CapEff:/ { print $2 }' "/proc/$pid/status")"
    rec main.state_directory_env "$(tr '\0' '\n' <"/proc/$pid/environ" | sed -n 's/^STATE_DIRECTORY=//p')"
    rec state.link "$(readlink /var/lib/edgenode)"
    rec state.dir "$(stat -c '%u %a %F' /var/lib/private/edgenode 2>&1)"
    # sled writes its files as the node starts; any file there not owned by
    # the service's user would mean it ran as someone else.
    rec state.files "$(find /var/lib/private/edgenode -mindepth 1 | wc -l)"
    rec state.foreign "$(find /var/lib/private/edgenode -not -uid "$(uid_of "$pid")" | wc -l)"
    # The sandbox was set up, not skipped (systemd skips it silently where it
    # lacks the privilege): own mount and user namespaces, the file system
    # read-only in the service's view except its state directory.
    # /proc/PID/root walks the service's own mounts (nsenter -m would land on
    # the namespace's bottom mount, under the read-only remount).
    rec main.own_mount_ns "$([ "$(readlink "/proc/$pid/ns/mnt")" != "$(readlink /proc/1/ns/mnt)" ] && echo yes || echo no)"
    rec main.own_user_ns "$([ "$(readlink "/proc/$pid/ns/user")" != "$(readlink /proc/1/ns/user)" ] && echo yes || echo no)"
    rec main.uid_map "$(awk '{ printf "%s %s %s;", $1, $2, $3 }' "/proc/$pid/uid_map")"
    rec main.can_write_etc "$(touch "/proc/$pid/root/etc/edgenode/probe" 2>/dev/null && echo yes || echo no)"
    rec main.can_write_state "$(touch "/proc/$pid/root/var/lib/edgenode/probe" 2>/dev/null && echo yes || echo no)"
    rm -f /var/lib/private/edgenode/probe /etc/edgenode/probe

    # --- a session survives systemctl restart -------------------------------------------------
    rec create.status "$(http POST /api/sessions '{"user_id":"nspawn","metadata":{"kept":"across restart"}}')"
    id=$(session_id)
    rec create.id "$id"
    rec restart.rc "$(systemctl restart edgenode.service >>"$P/systemctl.log" 2>&1; echo $?)"
    show restarted edgenode.service "${common_props[@]}"
    # No wait, no retry: systemctl restart of a Type=notify unit returns only
    # after READY=1, so the node must answer now.
    rec get_after_restart.status "$(http GET "/api/sessions/$id")"
    rec get_after_restart.body "$(cat "$P/body")"

    # --- the watchdog is pinged (not only armed) ------------------------------------------------
    # With WatchdogSec=2s systemd kills a node that does not ping within 2 s;
    # alive with the same pid 5 s later means the pings arrive.
    mkdir -p /run/systemd/system/edgenode.service.d
    printf '[Service]\nWatchdogSec=2s\n' >/run/systemd/system/edgenode.service.d/probe-watchdog.conf
    systemctl daemon-reload
    systemctl restart edgenode.service >>"$P/systemctl.log" 2>&1
    show wd0 edgenode.service MainPID NRestarts WatchdogUSec WatchdogTimestampMonotonic
    sleep 5
    show wd1 edgenode.service ActiveState MainPID NRestarts WatchdogUSec WatchdogTimestampMonotonic
    rm -rf /run/systemd/system/edgenode.service.d
    systemctl daemon-reload

    # --- systemctl stop drains in-flight requests and ends with Result=success ----------------
    # Three requests whose bodies are only half sent when the stop begins;
    # they are finished once systemd reports the unit deactivating.
    rm -f "$P/go"
    for i in 1 2 3; do
        (
            body="{\"user_id\":\"drain$i\"}"
            exec 3<>"/dev/tcp/127.0.0.1/$port" || { echo "connect failed" >"$P/inflight.$i"; exit; }
            printf 'POST /api/sessions HTTP/1.1\r\nHost: pi\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s' \
                "${#body}" "${body:0:6}" >&3
            while [ ! -e "$P/go" ]; do sleep 0.02; done
            printf '%s' "${body:6}" >&3
            timeout 10 cat <&3 >"$P/inflight.$i"
        ) &
    done
    in_flight=
    for _ in $(seq 100); do
        http GET /api/health >/dev/null
        in_flight=$(sed -n 's/.*"in_flight":\([0-9]*\).*/\1/p' "$P/body")
        [ "$in_flight" = 3 ] && break
        sleep 0.05
    done
    rec stop.in_flight_before "$in_flight"
    stop_pid_main=$(prop edgenode.service MainPID)
    (systemctl stop edgenode.service >>"$P/systemctl.log" 2>&1; echo $? >"$P/stop.rc") &
    stopper=$!
    if wait_prop edgenode.service ActiveState deactivating 10; then
        show stopping edgenode.service ActiveState SubState StatusText
        sleep 0.5
        # Still deactivating: the node waits for the requests in flight.
        rec stop.still_deactivating "$(prop edgenode.service ActiveState)"
    else
        rec stop.still_deactivating "never saw deactivating"
    fi
    touch "$P/go"
    wait "$stopper"
    wait
    rec stop.rc "$(cat "$P/stop.rc")"
    for i in 1 2 3; do rec "stop.inflight.$i" "$(head -n 1 "$P/inflight.$i" | tr -d '\r')"; done
    show stopped edgenode.service ActiveState SubState Result ExecMainCode ExecMainStatus MainPID
    rec stop.old_pid_gone "$([ -d "/proc/$stop_pid_main" ] && echo no || echo yes)"
    journalctl -u edgenode.service -o cat --no-pager >"$P/journal-edgenode.txt" 2>&1
    rec stop.flushed "$(grep -c 'local store flushed' "$P/journal-edgenode.txt")"

    # --- api_token_file through SupplementaryGroups, as docs/operations.md says -------------
    # "Rotating the API token", followed literally: the group, the file
    # root:edgenode-secrets 0640, the drop-in through `systemctl edit` (its
    # editor types the two lines the docs give), api_token_file in
    # edgenode.toml and one restart; then rotate with two reloads.
    tok_old=old-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
    tok_new=new-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
    tokens=/etc/edgenode/api-tokens
    rec tokens.groupadd_rc "$(groupadd --system edgenode-secrets 2>>"$P/tokens.log"; echo $?)"
    rec tokens.install_rc "$(install -m 0640 -g edgenode-secrets /dev/null "$tokens" 2>>"$P/tokens.log"; echo $?)"
    cat >"$P/editor.sh" <<'EDITOR'
#!/bin/sh
printf '[Service]\nSupplementaryGroups=edgenode-secrets\n' >"$1"
EDITOR
    chmod 0755 "$P/editor.sh"
    # systemctl edit wants a terminal: script(1) gives it one.
    SYSTEMD_EDITOR=$P/editor.sh script -qec 'systemctl edit edgenode' /dev/null >>"$P/tokens.log" 2>&1
    rec tokens.edit_rc "$?"
    rec tokens.dropin "$(paste -sd';' /etc/systemd/system/edgenode.service.d/override.conf 2>&1)"
    # Moving the current token into the file (this node had none in edgenode.env).
    printf '%s\n' "$tok_old" >"$tokens"
    printf '\napi_token_file = "%s"\n' "$tokens" >>/etc/edgenode/edgenode.toml
    rec tokens.restart_rc "$(systemctl restart edgenode.service >>"$P/systemctl.log" 2>&1; echo $?)"
    show tokens edgenode.service ActiveState MainPID SupplementaryGroups DropInPaths
    tpid=$(prop edgenode.service MainPID)
    rec tokens.file "$(stat -c '%U:%G %a' "$tokens")"
    rec tokens.secrets_gid "$(getent group edgenode-secrets | cut -d: -f3)"
    rec tokens.main_groups "$(awk '/^Groups:/ { $1 = ""; print substr($0, 2) }' "/proc/$tpid/status")"
    rec tokens.nobody_reads "$(runuser -u nobody -- cat "$tokens" >/dev/null 2>&1 && echo yes || echo no)"
    # auth TOKEN METHOD PATH [BODY]: like http, with the token ("" sends none).
    auth() {
        local tok=$1 args=(-sS --max-time 10 -o "$P/body" -w '%{http_code}' -X "$2")
        shift 2
        [ -z "$tok" ] || args+=(-H "authorization: Bearer $tok")
        [ $# -lt 2 ] || args+=(-H 'content-type: application/json' --data "$2")
        curl "${args[@]}" "$base$1" 2>>"$P/curl.err"
    }
    # tokens_check PREFIX: a session created with each token, read back with
    # it; a wrong token and none.
    tokens_check() {
        local t
        for t in old new; do
            local tok=$tok_old
            [ $t = old ] || tok=$tok_new
            rec "$1.$t.create" "$(auth "$tok" POST /api/sessions '{"user_id":"tokens"}')"
            rec "$1.$t.read" "$(auth "$tok" GET "/api/sessions/$(session_id)")"
        done
        rec "$1.wrong" "$(auth "wrong-$tok_new" POST /api/sessions '{"user_id":"tokens"}')"
        rec "$1.none" "$(auth "" POST /api/sessions '{"user_id":"tokens"}')"
    }
    tokens_check tokens.start
    # reload PREFIX: systemctl reload, then waits (bounded) for edgenode to
    # log that it re-read the file: ExecReload= only sends SIGHUP, so
    # systemctl returns before the node has read it.
    reload() {
        local before deadline=$((SECONDS + 10))
        before=$(journalctl -u edgenode.service -o cat --no-pager | grep -c 'api tokens reloaded')
        rec "$1.reload_rc" "$(systemctl reload edgenode.service >>"$P/systemctl.log" 2>&1; echo $?)"
        while [ "$(journalctl -u edgenode.service -o cat --no-pager | grep -c 'api tokens reloaded')" -le "$before" ]; do
            [ $SECONDS -lt $deadline ] || { rec "$1.reloaded" "not logged in 10 s"; return; }
            sleep 0.05
        done
        rec "$1.reloaded" "$(journalctl -u edgenode.service -o cat --no-pager | grep 'api tokens reloaded' | tail -n 1)"
        rec "$1.file" "$(stat -c '%U:%G %a' "$tokens")"
    }
    # Old and new, one a line; reload: both accepted.
    printf '%s\n' "$tok_new" >>"$tokens"
    reload tokens.both
    tokens_check tokens.both
    # The old one removed; reload: only the new one.
    printf '%s\n' "$tok_new" >"$tokens"
    reload tokens.new
    tokens_check tokens.new
    show tokens.end edgenode.service ActiveState MainPID NRestarts
    journalctl -u edgenode.service -o cat --no-pager >"$P/journal-tokens.txt" 2>&1

elif [ "$mode" = socket ]; then
    # --- socket activation: the socket listens, the service was handed it ----------------------
    show sock edgenode.socket ActiveState SubState Listen
    show start edgenode.service "${common_props[@]}" TriggeredBy After
    rec create.status "$(http POST /api/sessions '{"user_id":"socket","metadata":{"k":"v"}}')"
    id=$(session_id)
    rec create.id "$id"
    # edgenode.toml says listen = 127.0.0.1:8079 (written by the test): under
    # activation that is ignored, so nothing listens there.
    curl -sS --max-time 5 -o /dev/null http://127.0.0.1:8079/api/health 2>/dev/null
    rec own_listen.curl_rc "$?"

    # --- systemctl restart under load: no connection refused ---------------------------------------
    # Four clients, each one request per connection (curl exits 7 when a
    # connection is refused); "start end curl-exit-code http-status" per line.
    rm -f "$P/stop-load"
    for w in 1 2 3 4; do
        (
            : >"$P/load.$w"
            while [ ! -e "$P/stop-load" ]; do
                t0=$EPOCHREALTIME
                code=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 15 "$base/api/sessions/$id" 2>>"$P/load.$w.err")
                rc=$?
                echo "$t0 $EPOCHREALTIME $rc $code" >>"$P/load.$w"
            done
        ) &
    done
    sleep 1
    pids=$(prop edgenode.service MainPID)
    for r in 1 2 3; do
        rec "restart.$r.begin" "$EPOCHREALTIME"
        systemctl restart edgenode.service >>"$P/systemctl.log" 2>&1
        rec "restart.$r.rc" "$?"
        rec "restart.$r.end" "$EPOCHREALTIME"
        pids="$pids $(prop edgenode.service MainPID)"
        sleep 1
    done
    touch "$P/stop-load"
    wait
    rec restart.pids "$pids"
    show restarted edgenode.service "${common_props[@]}"
    show restarted_sock edgenode.socket ActiveState SubState

    # --- stop the service alone: drains, Result=success, the socket keeps listening --------------
    rec stop.rc "$(systemctl stop edgenode.service >>"$P/systemctl.log" 2>&1; echo $?)"
    show stopped edgenode.service ActiveState Result ExecMainCode ExecMainStatus
    show stopped_sock edgenode.socket ActiveState SubState
    # The next connection starts edgenode again.
    rec reactivated.status "$(http GET "/api/sessions/$id")"
    show reactivated edgenode.service ActiveState MainPID
    # Taking the node out: both units stopped, the port closes.
    systemctl stop edgenode.socket edgenode.service >>"$P/systemctl.log" 2>&1
    show out edgenode.service ActiveState Result
    show out_sock edgenode.socket ActiveState
    curl -sS --max-time 5 -o /dev/null "$base/api/health" 2>/dev/null
    rec out.curl_rc "$?"
    journalctl -u edgenode.service -u edgenode.socket -o cat --no-pager >"$P/journal-edgenode.txt" 2>&1
else
    rec error "unknown mode $mode"
fi

# Only ours: a container on a cgroup v1 host fails the odd unrelated unit.
systemctl list-units --failed --no-legend --plain 'edgenode*' >"$P/failed-units.txt" 2>&1
rec "done" 1
