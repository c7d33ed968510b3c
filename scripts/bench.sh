#!/usr/bin/env bash
# Measures what the performance targets (docs/performance.md) talk about, in one run:
#
#   - session touch (GET /api/session with a cookie) req/s and p99 with wrk at
#     $CONNS connections over $HOT hot sessions, in sled mode and in Redis mode
#     (near cache on, the default), and the CPU each costs the node and Redis;
#     then Redis mode again over $SPREAD sessions;
#   - redis-benchmark -t get at the same concurrency and its Redis CPU per GET;
#   - the near cache's own memory with $SESSIONS sessions cached;
#   - shared cache: GET hits served by a node's memory tier, req/s with wrk at
#     $CONNS connections against that redis-benchmark GET figure, and the
#     node's memory per cached byte (RSS growth over $CACHE_FILL values of
#     1 KiB, divided by their bytes);
#   - idle RSS and threads; RSS and threads with 1 000 open connections and
#     100 000 stored sessions;
#   - start-to-ready time and the stripped binary sizes.
#
# Usage: scripts/bench.sh [seconds per wrk run, default 10]
#   BIN=path/to/edgenode   measure that build (e.g. the static musl release,
#                          target/x86_64-unknown-linux-musl/release/edgenode)
#                          instead of the host release build (built here, in
#                          $CARGO_TARGET_DIR when set, else target/)
# Everything runs on 127.0.0.1 and is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${1:-10}"
CONNS="${CONNS:-64}"
SESSIONS="${SESSIONS:-100000}"
OPEN_CONNS="${OPEN_CONNS:-1000}"
# Hot sessions in the touch runs: one per connection (a browser each), and
# a second Redis-mode run spread over $SPREAD sessions.
HOT="${HOT:-$CONNS}"
SPREAD="${SPREAD:-1000}"
CACHE_FILL="${CACHE_FILL:-6000}"

# wrk, redis-server and redis-benchmark, from the list test.sh uses (scripts/needs.sh).
# shellcheck source=scripts/needs.sh
. scripts/needs.sh
NEEDS_WHO=bench.sh needs_install host bench

if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet
  BIN="${CARGO_TARGET_DIR:-target}/release/edgenode"
fi
WORK=$(mktemp -d /tmp/edgenode-bench.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ms_now() { date +%s%3N; }

wait_ready() {  # url
  for _ in $(seq 1 500); do
    curl -fs "$1/api/ready" >/dev/null 2>&1 && return 0
    sleep 0.01
  done
  echo "node at $1 did not become ready" >&2; exit 1
}

cpu_ticks() {  # pid → user+system CPU time in clock ticks
  awk '{ print $14 + $15 }' "/proc/$1/stat"
}
us_per() {  # ticks_before ticks_after count → CPU microseconds per item
  python3 -c "print(f'{($2 - $1) * 1e6 / $(getconf CLK_TCK) / max($3, 1):.1f}')"
}

proc_field() {  # pid field
  awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"
}

start_node() {  # name port [args...]; sets NODE_PID, READY_MS
  local name=$1 port=$2; shift 2
  local t0; t0=$(ms_now)
  "$BIN" --config /dev/null --listen "127.0.0.1:$port" --data-dir "$WORK/$name" \
    --log-level warn "$@" 2>"$WORK/$name.log" &
  NODE_PID=$!
  PIDS+=("$NODE_PID")
  wait_ready "http://127.0.0.1:$port"
  READY_MS=$(( $(ms_now) - t0 ))
}

touch_bench() {  # port [sessions] → prints "req/s p99"
  local url="http://127.0.0.1:$1" hot="${2:-$HOT}"
  # $HOT sessions, used in turn: each connection walks the list from its
  # own place, so every request names another session than the last.
  python3 - "$1" "$hot" >"$WORK/hot.lua" <<'PY'
import http.client, json, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
c = http.client.HTTPConnection("127.0.0.1", port)
ids = []
for i in range(n):
    c.request("POST", "/api/sessions", body='{"user_id":"hot%d"}' % i,
              headers={"Content-Type": "application/json"})
    ids.append(json.loads(c.getresponse().read())["session_id"])
print("local ids = {" + ",".join('"%s"' % i for i in ids) + "}")
PY
  cat >>"$WORK/hot.lua" <<'LUA'
local i = math.random(#ids)
request = function()
  i = i % #ids + 1
  return wrk.format("GET", "/api/session", {["Cookie"] = "session_id=" .. ids[i]})
end
LUA
  cp "$WORK/hot.lua" "$WORK/touch.lua"
  wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency -s "$WORK/touch.lua" "$url/api/session" >"$WORK/wrk.out"
  local rps p99
  rps=$(awk '/^Requests\/sec/ { print $2 }' "$WORK/wrk.out")
  p99=$(awk '$1 == "99%" { print $2 }' "$WORK/wrk.out")
  local non2xx
  non2xx=$(awk '/Non-2xx/ { print $5 }' "$WORK/wrk.out")
  [ -n "$non2xx" ] && echo "warning: $non2xx non-2xx answers" >&2
  echo "$rps $p99"
}

echo "edgenode bench: $(nproc) cores, wrk ${DURATION}s at $CONNS connections, binary $BIN ($("$BIN" --version))"
echo

# --- sled mode ---------------------------------------------------------------
SLED_PORT=$(free_port)
start_node sled "$SLED_PORT"
SLED_PID=$NODE_PID
SLED_READY_MS=$READY_MS
sleep 1  # let start-up allocations settle before reading idle RSS
IDLE_RSS=$(proc_field "$SLED_PID" VmRSS)
IDLE_THREADS=$(proc_field "$SLED_PID" Threads)
S0=$(cpu_ticks "$SLED_PID")
read -r SLED_RPS SLED_P99 < <(touch_bench "$SLED_PORT")
SLED_NODE_US=$(us_per "$S0" "$(cpu_ticks "$SLED_PID")" "$(python3 -c "print(int(float('$SLED_RPS') * $DURATION))")")
SLED_THREADS_LOAD=$(proc_field "$SLED_PID" Threads)

# --- Redis mode ----------------------------------------------------------------
REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$WORK" >"$WORK/redis.log" 2>&1 &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
for _ in $(seq 1 300); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.01; done
REDIS_NODE_PORT=$(free_port)
start_node redisnode "$REDIS_NODE_PORT" --redis-url "redis://127.0.0.1:$REDIS_PORT/"
REDIS_NODE_PID=$NODE_PID
for _ in $(seq 1 300); do
  curl -fs "http://127.0.0.1:$REDIS_NODE_PORT/api/health" | grep -q '"active":"redis"' && break
  sleep 0.01
done
N0=$(cpu_ticks "$REDIS_NODE_PID"); R0=$(cpu_ticks "$REDIS_PID")
read -r REDIS_RPS REDIS_P99 < <(touch_bench "$REDIS_NODE_PORT")
N1=$(cpu_ticks "$REDIS_NODE_PID"); R1=$(cpu_ticks "$REDIS_PID")
TOUCHES=$(python3 -c "print(int(float('$REDIS_RPS') * $DURATION))")
NODE_US=$(us_per "$N0" "$N1" "$TOUCHES"); REDIS_TOUCH_US=$(us_per "$R0" "$R1" "$TOUCHES")
REDIS_THREADS_LOAD=$(proc_field "$REDIS_NODE_PID" Threads)
# -q prints progress lines ending in \r; the final figure follows the last \r.
GETS=$(( 400000 * DURATION / 10 ))
R0=$(cpu_ticks "$REDIS_PID")
GET_RPS=$(redis-benchmark -p "$REDIS_PORT" -t get -c "$CONNS" -n "$GETS" -q 2>/dev/null \
  | tr '\r' '\n' | awk '/^GET: [0-9.]+ requests per second/ { print $2 }' | tail -1)
REDIS_GET_US=$(us_per "$R0" "$(cpu_ticks "$REDIS_PID")" "$GETS")
ratio() { python3 -c "print(f'{float(\"$1\") / max(float(\"$2\"), 1e-9):.2f}')"; }
RATIO=$(ratio "$REDIS_RPS" "$GET_RPS")
MODE_RATIO=$(ratio "$REDIS_RPS" "$SLED_RPS")
REDIS_CPU_RATIO=$(ratio "$REDIS_TOUCH_US" "$REDIS_GET_US")
NODE_CPU_RATIO=$(ratio "$NODE_US" "$SLED_NODE_US")
NEAR_HITS=$(curl -fs "http://127.0.0.1:$REDIS_NODE_PORT/api/health" | python3 -c 'import sys,json; n=json.load(sys.stdin)["store"]["near_cache"]; print(n["hits"], "hits,", n["misses"], "misses")')
# The same over $SPREAD sessions: fewer uses of each per flush interval, so
# each written-behind command covers fewer uses.
N0=$(cpu_ticks "$REDIS_NODE_PID"); R0=$(cpu_ticks "$REDIS_PID")
read -r SPREAD_RPS SPREAD_P99 < <(touch_bench "$REDIS_NODE_PORT" "$SPREAD")
N1=$(cpu_ticks "$REDIS_NODE_PID"); R1=$(cpu_ticks "$REDIS_PID")
SPREAD_TOUCHES=$(python3 -c "print(int(float('$SPREAD_RPS') * $DURATION))")
SPREAD_NODE_US=$(us_per "$N0" "$N1" "$SPREAD_TOUCHES"); SPREAD_REDIS_US=$(us_per "$R0" "$R1" "$SPREAD_TOUCHES")
SPREAD_CPU_RATIO=$(ratio "$SPREAD_REDIS_US" "$REDIS_GET_US")

# --- shared cache (same Redis-mode node) ---------------------------------------
# A 1 KiB value, then wrk GETs of it: after the PUT it sits in the node's
# memory tier, so no request goes to Redis.
CACHE_URL="http://127.0.0.1:$REDIS_NODE_PORT/api/cache/bench/hot"
python3 -c 'import sys; sys.stdout.write("x" * 1024)' >"$WORK/value"
curl -fs -XPUT -H 'Content-Type: text/html' --data-binary @"$WORK/value" "$CACHE_URL"
[ "$(curl -fs -o /dev/null -w '%header{x-cache}' "$CACHE_URL")" = memory ] \
  || echo "warning: the cache bench value is not served from memory" >&2
wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency "$CACHE_URL" >"$WORK/cache.out"
CACHE_RPS=$(awk '/^Requests\/sec/ { print $2 }' "$WORK/cache.out")
CACHE_P99=$(awk '$1 == "99%" { print $2 }' "$WORK/cache.out")
CACHE_NON2XX=$(awk '/Non-2xx/ { print $5 }' "$WORK/cache.out")
[ -n "$CACHE_NON2XX" ] && echo "warning: $CACHE_NON2XX non-2xx cache answers" >&2
CACHE_RATIO=$(python3 -c "print(f'{float(\"$CACHE_RPS\") / float(\"$GET_RPS\"):.2f}')")
# Memory per cached byte: $CACHE_FILL values of 1 KiB (within the default
# 8 MB tier, so none is evicted), RSS before and after, on one keep-alive
# connection.
sleep 1
CACHE_RSS0=$(proc_field "$REDIS_NODE_PID" VmRSS)
python3 - "$REDIS_NODE_PORT" "$CACHE_FILL" <<'PY'
import http.client, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
c = http.client.HTTPConnection("127.0.0.1", port)
body = b"v" * 1024
for i in range(n):
    c.request("PUT", f"/api/cache/fill/key-{i:06d}", body, {"Content-Type": "text/plain"})
    r = c.getresponse(); r.read()
    assert r.status == 204, r.status
PY
sleep 1
CACHE_RSS1=$(proc_field "$REDIS_NODE_PID" VmRSS)
CACHE_TIER_BYTES=$(curl -fs "http://127.0.0.1:$REDIS_NODE_PORT/metrics" | awk '$1 == "edgenode_cache_bytes{tier=\"memory\"}" { print $2 }')
PER_BYTE=$(python3 -c "print(f'{($CACHE_RSS1 - $CACHE_RSS0) * 1024 / ($CACHE_FILL * 1024):.2f}')")
kill "$REDIS_NODE_PID"

# --- the near cache's own memory: $SESSIONS sessions created and each read
# once on a Redis-mode node whose cache holds them all ----------------------
NEAR_PORT=$(free_port)
start_node nearnode "$NEAR_PORT" --redis-url "redis://127.0.0.1:$REDIS_PORT/" --near-cache-mb 256
NEAR_PID=$NODE_PID
for _ in $(seq 1 300); do
  curl -fs "http://127.0.0.1:$NEAR_PORT/api/health" | grep -q '"up":true' && break
  sleep 0.01
done
NEAR_RSS0=$(proc_field "$NEAR_PID" VmRSS)
near_stat() { curl -fs "http://127.0.0.1:$NEAR_PORT/api/health" | python3 -c "import sys,json; print(json.load(sys.stdin)['store']['near_cache']['$1'])"; }
# Each create's answer names the session the next request on that thread reads.
for _ in 1 2 3 4 5 6; do
  MISSING=$(( SESSIONS - $(near_stat entries) ))
  [ "$MISSING" -le 0 ] && break
  cat >"$WORK/fill_near.lua" <<LUA
local quota = math.ceil($MISSING / 2)
local made, ids = 0, {}
request = function()
  if #ids > 0 then
    return wrk.format("GET", "/api/session", {["Cookie"] = "session_id=" .. table.remove(ids)})
  end
  made = made + 1
  if made > quota then return wrk.format("GET", "/api/ready") end
  return wrk.format("POST", "/api/sessions", {["Content-Type"] = "application/json"},
    '{"user_id":"n' .. (made % 5000) .. '","metadata":{"cart":[1,2,3],"theme":"dark"}}')
end
response = function(status, headers, body)
  local id = body:match('"session_id":"([0-9a-f-]+)"')
  if status == 201 and id then ids[#ids + 1] = id end
end
LUA
  wrk -t2 -c"$CONNS" -d5s -s "$WORK/fill_near.lua" "http://127.0.0.1:$NEAR_PORT" >"$WORK/fill_near.out"
done
NEAR_ENTRIES=$(near_stat entries)
NEAR_BYTES=$(near_stat bytes)
NEAR_RSS1=$(proc_field "$NEAR_PID" VmRSS)
kill "$NEAR_PID"

# --- memory with many sessions and connections (sled mode) -------------------
# Exactly $SESSIONS sessions (the target's figure), spread over many users so
# per-user indexes stay realistic: each wrk thread creates its share, then
# only reads /api/ready until the run ends.
active() { curl -fs "http://127.0.0.1:$SLED_PORT/api/health" | python3 -c 'import sys,json; print(json.load(sys.stdin)["sessions"]["active"])'; }
T0=$(ms_now)
while :; do
  MISSING=$(( SESSIONS - $(active) ))
  [ "$MISSING" -le 0 ] && break
  cat >"$WORK/create.lua" <<LUA
local quota = math.ceil($MISSING / 2)
local n = 0
request = function()
  n = n + 1
  if n > quota then return wrk.format("GET", "/api/ready") end
  return wrk.format("POST", "/api/sessions", {["Content-Type"] = "application/json"},
    '{"user_id":"u' .. (n % 5000) .. '","metadata":{"cart":[1,2,3],"theme":"dark"}}')
end
LUA
  wrk -t2 -c"$CONNS" -d5s -s "$WORK/create.lua" "http://127.0.0.1:$SLED_PORT" >"$WORK/create.out"
done
FILL_S=$(( ($(ms_now) - T0) / 1000 ))
STORED=$(active)

# Opens $OPEN_CONNS keep-alive connections, one request each, and prints
# "answered RSS_kB threads" while they are all open.
hold_conns() {  # port pid
  python3 - "$1" "$OPEN_CONNS" "$2" <<'PY'
import socket, sys
port, n, pid = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
socks = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /api/health HTTP/1.1\r\nHost: bench\r\n\r\n")
    socks.append(s)
ok = 0
for s in socks:
    data = s.recv(65536)
    ok += data.startswith(b"HTTP/1.1 200")
status = open(f"/proc/{pid}/status").read().split("\n")
field = lambda f: next(l.split()[1] for l in status if l.startswith(f + ":"))
print(ok, field("VmRSS"), field("Threads"))
PY
}

hold_conns "$SLED_PORT" "$SLED_PID" >"$WORK/conns.out"
read -r CONNS_OK LOADED_RSS LOADED_THREADS <"$WORK/conns.out"

# --- restart with the full store: start-to-ready and RSS ---------------------
kill "$SLED_PID"; wait "$SLED_PID" 2>/dev/null || true
start_node sled "$SLED_PORT"
FULL_READY_MS=$READY_MS
sleep 1
RESTART_RSS=$(proc_field "$NODE_PID" VmRSS)
read -r _ RESTART_LOADED_RSS RESTART_LOADED_THREADS < <(hold_conns "$SLED_PORT" "$NODE_PID")

SIZE_HOST=$(stat -c %s "$BIN")
SIZE_AARCH64="not built (scripts/release.sh)"
for f in target/aarch64-unknown-linux-musl/release/edgenode target/cross/aarch64-unknown-linux-musl/release/edgenode; do
  [ -f "$f" ] && SIZE_AARCH64="$(stat -c %s "$f") bytes ($f)"
done

kb_mb() { python3 -c "print(f'{int(\"$1\")/1024:.1f} MB')"; }
cat <<REPORT
== touch (GET /api/session with cookie), $CONNS connections, ${DURATION}s
sled mode       : $SLED_RPS req/s   p99 $SLED_P99   (target >= 40000 req/s)
redis mode      : $REDIS_RPS req/s   p99 $REDIS_P99
redis-benchmark : $GET_RPS GET/s at -c $CONNS
                  $HOT hot sessions (one per connection); redis mode with its near cache ($NEAR_HITS)
redis/sled      : $MODE_RATIO x   (target >= 0.9)
redis/GET rate  : $RATIO x redis-benchmark GET
CPU per touch   : node $SLED_NODE_US us in sled mode, $NODE_US us in redis mode ($NODE_CPU_RATIO x; target <= 1.2)
                  redis $REDIS_TOUCH_US us per touch, $REDIS_GET_US us per redis-benchmark GET ($REDIS_CPU_RATIO x; target <= 0.2)
                  (all of it shares $(nproc) cores with the load generator)
spread over $SPREAD: redis mode $SPREAD_RPS req/s p99 $SPREAD_P99; node $SPREAD_NODE_US us + redis $SPREAD_REDIS_US us per touch ($SPREAD_CPU_RATIO x a GET)
near cache      : $NEAR_ENTRIES sessions cached in $(python3 -c "print(f'{$NEAR_BYTES/1048576:.1f}')") MB by its own estimate ($(python3 -c "print(round($NEAR_BYTES/max($NEAR_ENTRIES,1)))") bytes each);
                  the node's RSS grew $(kb_mb "$(( NEAR_RSS1 - NEAR_RSS0 ))") while creating and caching them

== shared cache
GET hit (memory tier): $CACHE_RPS req/s   p99 $CACHE_P99   = $CACHE_RATIO x redis-benchmark GET ($GET_RPS/s)
memory per cached byte: $PER_BYTE   (RSS $(kb_mb "$CACHE_RSS0") -> $(kb_mb "$CACHE_RSS1") for $CACHE_FILL values of 1 KiB; the tier counts $CACHE_TIER_BYTES bytes)

== footprint
idle RSS        : $(kb_mb "$IDLE_RSS")   (target < 12 MB)
idle threads    : $IDLE_THREADS
threads under wrk load: sled $SLED_THREADS_LOAD, redis $REDIS_THREADS_LOAD   (target <= workers + blocking + 2 = $(( $(nproc) + 2 + 2 )))
stored sessions : $STORED (created in 5 s wrk runs, ${FILL_S}s in all, each create fsync-acknowledged)
right after the fill, with $OPEN_CONNS open connections: RSS $(kb_mb "$LOADED_RSS"), threads $LOADED_THREADS, $CONNS_OK/$OPEN_CONNS answered   (target < 32 MB)
restarted on the $STORED sessions: idle RSS $(kb_mb "$RESTART_RSS"); with $OPEN_CONNS open connections RSS $(kb_mb "$RESTART_LOADED_RSS"), threads $RESTART_LOADED_THREADS   (target < 32 MB)
start to ready  : ${SLED_READY_MS} ms empty, ${FULL_READY_MS} ms with $STORED sessions   (target < 100 ms)
binary measured ($BIN): $SIZE_HOST bytes
binary (aarch64 musl)          : $SIZE_AARCH64   (target < 4 MB)
REPORT
