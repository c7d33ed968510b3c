#!/usr/bin/env bash
# Measures what the performance targets (docs/performance.md) talk about, in one run.
#
# touch (hot sessions):
#   - session touch (GET /api/session with a cookie) req/s and p99 with wrk at
#     $CONNS connections over $HOT hot sessions, in sled mode and in Redis mode
#     (near cache on, the default), and the CPU each costs the node and Redis;
#     then Redis mode again over $SPREAD sessions;
#   - redis-benchmark -t get at the same concurrency and its Redis CPU per GET;
#   - shared cache: GET hits served by a node's memory tier, req/s with wrk at
#     $CONNS connections against that redis-benchmark GET figure, and the
#     node's memory per cached byte (RSS growth over $CACHE_FILL values of
#     1 KiB, divided by their bytes);
# memory:
#   - idle RSS and threads; the near cache's own memory with $SESSIONS
#     sessions cached; RSS and threads with 1 000 open connections and
#     100 000 stored sessions; start-to-ready time and the binary sizes;
# spread (the shape of a LAN of browsers: many sessions, each used now and then):
#   - in Redis mode and in sled mode, fresh nodes: the hot case (as many
#     sessions as connections), then each request a random one of N sessions
#     made beforehand, N in $SPREAD_NS, uniform and Zipf (s = $ZIPF_S, by an
#     inverse-CDF table): req/s, p99, node and Redis CPU per use, node RSS at
#     the end of the run and its peak; redis-benchmark -t get and
#     -t incr -P 16 (the pipelined floor) on the same Redis; ratios to the hot
#     case and to redis-benchmark, against the targets;
# wear (SD card; data directory under $WEAR_DIR, which must not be tmpfs):
#   - after $WEAR_SESSIONS sessions are made and a first $WEAR_WARMUP_SECS s
#     of uses at the highest rate (reported apart: the first uses after
#     the creates write much more), uses paced at each rate of $WEAR_RATES
#     a second over those sessions, $WEAR_SECS s each, and creates paced at $CREATE_RATE a second
#     for $CREATE_SECS s, in Redis mode and in sled mode: bytes the node wrote
#     (/proc/<pid>/io write_bytes) per use and per create, and fsync-family
#     calls per second (strace -c attached for the window); and the same
#     over $WEAR_IDLE_SECS s with no requests at all (what the node does on
#     its own);
#   - for each window also what the block device under $WEAR_DIR wrote
#     (/sys/dev/block/MAJ:MIN/stat, with a sync at both ends), less the
#     lower rate it showed in $WEAR_IDLE_SECS s windows with no node running,
#     before and after the modes: what the card sees, file system journal
#     included. write_bytes counts a
#     whole page-cache folio each time a write dirties one; on kernels whose
#     ext4 caches files in large folios (6.x here) a small write into a
#     large folio counts tens of times what reaches the disk, so both are
#     reported.
#
# Usage: scripts/bench.sh [seconds per wrk run, default 10]
#   BIN=path/to/edgenode   measure that build (e.g. the static musl release,
#                          target/x86_64-unknown-linux-musl/release/edgenode)
#                          instead of the host release build (built here, in
#                          $CARGO_TARGET_DIR when set, else target/)
#   ONLY=touch|memory|spread|wear   run one part (default: all four)
#   REPEAT=3               run the spread and wear measurements 3 times (on
#                          the same nodes and sessions) and report medians
#                          and min-max
#   BENCH_KV=file          also keep the raw measurements there ("REPEAT KEY
#                          VALUE" lines; scripts/bench/report.py FILE reprints)
#   QUICK=1                smoke run: 2 s wrk runs, 5 s wear windows, 2 000
#                          sessions (numbers meaningless, every path runs)
# It prints a report a person reads, then key=value lines (medians; with
# REPEAT also KEY.min, KEY.max, KEY.n) for a program to collect.
# Everything runs on 127.0.0.1 and is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK="${QUICK:-0}"
if [ "$QUICK" = 1 ]; then
  DEFAULT_DURATION=2
  SESSIONS="${SESSIONS:-2000}"
  CACHE_FILL="${CACHE_FILL:-600}"
  SPREAD_NS="${SPREAD_NS:-1000 2000}"
  WEAR_SESSIONS="${WEAR_SESSIONS:-2000}"
  WEAR_SECS="${WEAR_SECS:-5}"
  CREATE_SECS="${CREATE_SECS:-5}"
  WEAR_IDLE_SECS="${WEAR_IDLE_SECS:-3}"
  WEAR_WARMUP_SECS="${WEAR_WARMUP_SECS:-3}"
fi
DURATION="${1:-${DEFAULT_DURATION:-10}}"
ONLY="${ONLY:-all}"
REPEAT="${REPEAT:-1}"
CONNS="${CONNS:-64}"
SESSIONS="${SESSIONS:-100000}"
OPEN_CONNS="${OPEN_CONNS:-1000}"
# Hot sessions in the touch runs: one per connection (a browser each), and
# a second Redis-mode run spread over $SPREAD sessions.
HOT="${HOT:-$CONNS}"
SPREAD="${SPREAD:-1000}"
CACHE_FILL="${CACHE_FILL:-6000}"
# The spread part: session counts, and the Zipf exponent of the skewed mix.
SPREAD_NS="${SPREAD_NS:-10000 100000}"
ZIPF_S="${ZIPF_S:-1}"
# The wear part.
WEAR_DIR="${WEAR_DIR:-/var/tmp}"
WEAR_SESSIONS="${WEAR_SESSIONS:-10000}"
WEAR_RATES="${WEAR_RATES:-20 200}"
WEAR_SECS="${WEAR_SECS:-60}"
CREATE_RATE="${CREATE_RATE:-20}"
CREATE_SECS="${CREATE_SECS:-20}"
WEAR_IDLE_SECS="${WEAR_IDLE_SECS:-20}"
WEAR_WARMUP_SECS="${WEAR_WARMUP_SECS:-60}"

case "$ONLY" in
  all | touch | memory | spread | wear) ;;
  *) echo "bench.sh: ONLY=$ONLY: one of touch, memory, spread, wear (or unset for all)" >&2; exit 2 ;;
esac
[[ "$REPEAT" =~ ^[1-9][0-9]*$ ]] || { echo "bench.sh: REPEAT=$REPEAT: a count from 1" >&2; exit 2; }
runs() { [ "$ONLY" = all ] || [ "$ONLY" = "$1" ]; }

# wrk, redis-server, redis-benchmark and strace, from the list test.sh uses
# (scripts/needs.sh).
# shellcheck source=scripts/needs.sh
. scripts/needs.sh
NEEDS_WHO=bench.sh needs_install host bench

if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet
  BIN="${CARGO_TARGET_DIR:-target}/release/edgenode"
fi
WORK=$(mktemp -d /tmp/edgenode-bench.XXXXXX)
WEAR_ROOT=""
PACED_OUT=""
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
  if [ -n "$WEAR_ROOT" ]; then rm -rf "$WEAR_ROOT"; fi
  if [ -n "$PACED_OUT" ]; then rm -f "$PACED_OUT"; fi
}
trap cleanup EXIT

# Every figure is also recorded here as "REPEAT KEY VALUE" for
# scripts/bench/report.py (the key=value lines, medians, ratios per repeat).
KV="$WORK/kv"
: >"$KV"
REP=1
kv() { echo "$REP $1 $2" >>"$KV"; }
progress() { echo "bench: $*" >&2; }

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
# The same with more digits: Redis's share of a use can be a few hundredths
# of a microsecond.
us_per3() {
  python3 -c "print(f'{($2 - $1) * 1e6 / $(getconf CLK_TCK) / max($3, 1):.3f}')"
}

proc_field() {  # pid field
  awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"
}
write_bytes() {  # pid → bytes the process has caused to be written to storage
  awk '$1 == "write_bytes:" { print $2 }' "/proc/$1/io"
}
# The block device holding WEAR_DIR (its stat file), empty when it has none
# (tmpfs, overlay, a btrfs subvolume: MAJ:MIN with no block device).
wear_device_stat() {
  local majmin
  majmin=$(findmnt -no MAJ:MIN --target "$WEAR_DIR" 2>/dev/null | head -n 1 | tr -d ' ')
  if [ -n "$majmin" ] && [ -r "/sys/dev/block/$majmin/stat" ]; then
    echo "/sys/dev/block/$majmin/stat"
  fi
}
device_bytes() {  # bytes the wear device has written since boot, after a sync
  sync
  if [ -n "$WEAR_STAT" ]; then echo $(( $(awk '{ print $7 }' "$WEAR_STAT") * 512 )); fi
}
# wrk's p99 ("850.00us", "2.34ms", "1.02s") in milliseconds.
p99_ms() {  # wrk output file
  awk '$1 == "99%" {
    v = $2; u = v; sub(/[0-9.]+/, "", u); sub(/[a-z]+$/, "", v)
    m = (u == "us") ? v / 1000 : (u == "s") ? v * 1000 : (u == "m") ? v * 60000 : v
    printf "%.3f\n", m }' "$1"
}

start_node() {  # name port [args...]; sets NODE_PID, READY_MS; data in $NODE_DIR or $WORK/name
  local name=$1 port=$2; shift 2
  local t0; t0=$(ms_now)
  "$BIN" --config /dev/null --listen "127.0.0.1:$port" --data-dir "${NODE_DIR:-$WORK/$name}" \
    --log-level warn "$@" 2>"$WORK/$name.log" &
  NODE_PID=$!
  PIDS+=("$NODE_PID")
  wait_ready "http://127.0.0.1:$port"
  READY_MS=$(( $(ms_now) - t0 ))
}
stop_pid() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

start_redis() {  # sets R_PORT, R_PID: a Redis without persistence
  R_PORT=$(free_port)
  redis-server --port "$R_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$WORK" >"$WORK/redis-$R_PORT.log" 2>&1 &
  R_PID=$!
  PIDS+=("$R_PID")
  for _ in $(seq 1 300); do redis-cli -p "$R_PORT" ping >/dev/null 2>&1 && return 0; sleep 0.01; done
  echo "redis on $R_PORT did not answer" >&2; exit 1
}
wait_redis_active() {  # node port
  for _ in $(seq 1 300); do
    curl -fs "http://127.0.0.1:$1/api/health" | grep -q '"active":"redis"' && return 0
    sleep 0.01
  done
  echo "node on $1 did not switch to redis" >&2; exit 1
}

# Creates sessions flat out through wrk (scripts/bench/create_ids.lua) until
# at least $2 are made, and writes the first $2 ids to $3, one a line.
create_ids() {  # port count file
  local port=$1 want=$2 out=$3 run=0 have quota f
  rm -f "$out".part.*
  while :; do
    have=0
    for f in "$out".part.*; do
      if [ -e "$f" ]; then have=$(( have + $(wc -l <"$f") )); fi
    done
    [ "$have" -ge "$want" ] && break
    run=$((run + 1))
    if [ "$run" -gt 30 ]; then echo "bench.sh: only $have of $want sessions could be created" >&2; exit 1; fi
    quota=$(( (want - have + 1) / 2 ))
    wrk -t2 -c"$CONNS" -d5s -s scripts/bench/create_ids.lua "http://127.0.0.1:$port" \
      -- "$out.part.r$run" "$quota" >"$WORK/create_ids.out"
  done
  cat "$out".part.* | awk -v n="$want" 'NR <= n' >"$out"
  rm -f "$out".part.*
  # Every id must name a live session: an unknown one would make
  # GET /api/session create a session instead of using one.
  local id
  for id in "$(sed -n 1p "$out")" "$(sed -n "$(( (want + 1) / 2 ))p" "$out")" "$(tail -1 "$out")"; do
    curl -fs -o /dev/null "http://127.0.0.1:$port/api/sessions/$id" \
      || { echo "bench.sh: created session $id is not there" >&2; exit 1; }
  done
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

ratio() { python3 -c "print(f'{float(\"$1\") / max(float(\"$2\"), 1e-9):.2f}')"; }
kb_mb() { python3 -c "print(f'{int(\"$1\")/1024:.1f} MB')"; }

# The sled-mode node the touch and memory parts share: started once, with
# its start-to-ready time, idle RSS and threads.
SLED_PID=""
main_sled() {
  [ -n "$SLED_PID" ] && return 0
  SLED_PORT=$(free_port)
  start_node sled "$SLED_PORT"
  SLED_PID=$NODE_PID
  SLED_READY_MS=$READY_MS
  sleep 1  # let start-up allocations settle before reading idle RSS
  IDLE_RSS=$(proc_field "$SLED_PID" VmRSS)
  IDLE_THREADS=$(proc_field "$SLED_PID" Threads)
}
# The Redis the touch and memory parts share.
REDIS_PID=""
main_redis() {
  [ -n "$REDIS_PID" ] && return 0
  start_redis
  REDIS_PORT=$R_PORT REDIS_PID=$R_PID
}

# --- touch: hot sessions, sled mode and Redis mode, and the shared cache -------
touch_part() {
main_sled
S0=$(cpu_ticks "$SLED_PID")
read -r SLED_RPS SLED_P99 < <(touch_bench "$SLED_PORT")
SLED_NODE_US=$(us_per "$S0" "$(cpu_ticks "$SLED_PID")" "$(python3 -c "print(int(float('$SLED_RPS') * $DURATION))")")
SLED_THREADS_LOAD=$(proc_field "$SLED_PID" Threads)

# --- Redis mode ----------------------------------------------------------------
main_redis
REDIS_NODE_PORT=$(free_port)
start_node redisnode "$REDIS_NODE_PORT" --redis-url "redis://127.0.0.1:$REDIS_PORT/"
REDIS_NODE_PID=$NODE_PID
wait_redis_active "$REDIS_NODE_PORT"
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
stop_pid "$REDIS_NODE_PID"

kv touch.sled.rps "$SLED_RPS"; kv touch.sled.node_us "$SLED_NODE_US"
kv touch.redis.rps "$REDIS_RPS"; kv touch.redis.node_us "$NODE_US"; kv touch.redis.redis_us "$REDIS_TOUCH_US"
kv touch.redis_benchmark.get_rps "$GET_RPS"; kv touch.redis_benchmark.get_us "$REDIS_GET_US"
kv touch.redis_over_sled "$MODE_RATIO"; kv touch.node_cpu_ratio "$NODE_CPU_RATIO"; kv touch.redis_cpu_ratio "$REDIS_CPU_RATIO"
kv touch.spread"$SPREAD".rps "$SPREAD_RPS"; kv touch.spread"$SPREAD".redis_cpu_ratio "$SPREAD_CPU_RATIO"
kv cache.memory_hit.rps "$CACHE_RPS"; kv cache.rss_per_byte "$PER_BYTE"
kv footprint.threads_load.sled "$SLED_THREADS_LOAD"; kv footprint.threads_load.redis "$REDIS_THREADS_LOAD"

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
threads under wrk load: sled $SLED_THREADS_LOAD, redis $REDIS_THREADS_LOAD   (target <= workers + blocking + 2 = $(( $(nproc) + 2 + 2 )))

== shared cache
GET hit (memory tier): $CACHE_RPS req/s   p99 $CACHE_P99   = $CACHE_RATIO x redis-benchmark GET ($GET_RPS/s)
memory per cached byte: $PER_BYTE   (RSS $(kb_mb "$CACHE_RSS0") -> $(kb_mb "$CACHE_RSS1") for $CACHE_FILL values of 1 KiB; the tier counts $CACHE_TIER_BYTES bytes)

REPORT
}
# --- memory: the near cache's own memory, many sessions and connections, restart
memory_part() {
main_sled
main_redis
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
stop_pid "$NEAR_PID"

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
stop_pid "$SLED_PID"
start_node sled "$SLED_PORT"
FULL_READY_MS=$READY_MS
sleep 1
RESTART_RSS=$(proc_field "$NODE_PID" VmRSS)
read -r _ RESTART_LOADED_RSS RESTART_LOADED_THREADS < <(hold_conns "$SLED_PORT" "$NODE_PID")
SLED_PID=$NODE_PID

SIZE_HOST=$(stat -c %s "$BIN")
SIZE_AARCH64="not built (scripts/release.sh)"
for f in target/aarch64-unknown-linux-musl/release/edgenode target/cross/aarch64-unknown-linux-musl/release/edgenode; do
  [ -f "$f" ] && SIZE_AARCH64="$(stat -c %s "$f") bytes ($f)"
done

kv footprint.idle_rss_kb "$IDLE_RSS"; kv footprint.idle_threads "$IDLE_THREADS"
kv footprint.near_cache.entries "$NEAR_ENTRIES"; kv footprint.near_cache.bytes "$NEAR_BYTES"
kv footprint.stored_sessions "$STORED"
kv footprint.filled_conns_rss_kb "$LOADED_RSS"; kv footprint.restarted_conns_rss_kb "$RESTART_LOADED_RSS"
kv footprint.ready_ms.empty "$SLED_READY_MS"; kv footprint.ready_ms.full "$FULL_READY_MS"
kv footprint.binary_bytes "$SIZE_HOST"

cat <<REPORT
== footprint
near cache      : $NEAR_ENTRIES sessions cached in $(python3 -c "print(f'{$NEAR_BYTES/1048576:.1f}')") MB by its own estimate ($(python3 -c "print(round($NEAR_BYTES/max($NEAR_ENTRIES,1)))") bytes each);
                  the node's RSS grew $(kb_mb "$(( NEAR_RSS1 - NEAR_RSS0 ))") while creating and caching them
idle RSS        : $(kb_mb "$IDLE_RSS")   (target < 12 MB)
idle threads    : $IDLE_THREADS
stored sessions : $STORED (created in 5 s wrk runs, ${FILL_S}s in all, each create fsync-acknowledged)
right after the fill, with $OPEN_CONNS open connections: RSS $(kb_mb "$LOADED_RSS"), threads $LOADED_THREADS, $CONNS_OK/$OPEN_CONNS answered   (target < 32 MB)
restarted on the $STORED sessions: idle RSS $(kb_mb "$RESTART_RSS"); with $OPEN_CONNS open connections RSS $(kb_mb "$RESTART_LOADED_RSS"), threads $RESTART_LOADED_THREADS   (target < 32 MB)
start to ready  : ${SLED_READY_MS} ms empty, ${FULL_READY_MS} ms with $STORED sessions   (target < 100 ms)
binary measured ($BIN): $SIZE_HOST bytes
binary (aarch64 musl)          : $SIZE_AARCH64   (target < 4 MB)

REPORT
}
# --- spread: many sessions, each used now and then -----------------------------
# One wrk run of scripts/bench/spread.lua: the first $6 ids of $5, picked
# $7 (uniform or zipf). Records req/s, p99, CPU per use of the node and of
# Redis (when $4 is a pid), and the node's RSS at the end and at its peak
# during the run (the peak is reset through clear_refs first).
spread_run() {  # mode port node_pid redis_pid ids_file n dist shape
  local mode=$1 port=$2 pid=$3 rpid=$4 ids=$5 n=$6 dist=$7 shape=$8
  local out="$WORK/spread-$mode-$shape.out" peak=1 n0 r0 n1 r1 uses rps p99 non2xx
  echo 5 >"/proc/$pid/clear_refs" 2>/dev/null || peak=0
  n0=$(cpu_ticks "$pid"); r0=0
  [ -n "$rpid" ] && r0=$(cpu_ticks "$rpid")
  wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency -s scripts/bench/spread.lua \
    "http://127.0.0.1:$port" -- "$ids" "$n" "$dist" "$ZIPF_S" >"$out"
  n1=$(cpu_ticks "$pid"); r1=0
  [ -n "$rpid" ] && r1=$(cpu_ticks "$rpid")
  uses=$(awk '/ requests in / { print $1 }' "$out")
  rps=$(awk '/^Requests\/sec/ { print $2 }' "$out")
  p99=$(p99_ms "$out")
  non2xx=$(awk '/Non-2xx/ { print $5 }' "$out")
  if [ -z "$uses" ] || [ -z "$rps" ]; then
    echo "bench.sh: wrk gave no figures for spread $mode $shape:" >&2; cat "$out" >&2; exit 1
  fi
  if [ -n "$non2xx" ]; then echo "warning: spread $mode $shape: $non2xx non-2xx answers" >&2; fi
  local b="spread.$mode.$shape"
  kv "$b.rps" "$rps"; kv "$b.p99_ms" "$p99"; kv "$b.requests" "$uses"; kv "$b.non2xx" "${non2xx:-0}"
  kv "$b.node_us" "$(us_per3 "$n0" "$n1" "$uses")"
  [ -n "$rpid" ] && kv "$b.redis_us" "$(us_per3 "$r0" "$r1" "$uses")"
  kv "$b.rss_end_kb" "$(proc_field "$pid" VmRSS)"
  if [ "$peak" = 1 ]; then
    kv "$b.rss_max_kb" "$(proc_field "$pid" VmHWM)"
  elif [ "$REP" = 1 ] && [ "$shape" = hot ]; then
    echo "warning: cannot reset the node's peak RSS (clear_refs): no RSS max reported" >&2
  fi
  progress "spread $mode $shape (repeat $REP): $rps req/s, p99 $p99 ms"
}

# redis-benchmark on the Redis of the spread part: GET at $CONNS (what a
# library reading the session from Redis per request pays, about) and
# INCR pipelined 16 deep (the cheapest a command gets).
redis_benchmark_runs() {  # redis port, redis pid
  local n=$(( 400000 * DURATION / 10 )) r0 rps
  r0=$(cpu_ticks "$2")
  rps=$(redis-benchmark -p "$1" -t get -c "$CONNS" -n "$n" -q 2>/dev/null \
    | tr '\r' '\n' | awk '/^GET: [0-9.]+ requests per second/ { print $2 }' | tail -1)
  kv spread.redis.get_rps "$rps"; kv spread.redis.get_us "$(us_per3 "$r0" "$(cpu_ticks "$2")" "$n")"
  n=$(( 2000000 * DURATION / 10 ))
  r0=$(cpu_ticks "$2")
  rps=$(redis-benchmark -p "$1" -t incr -P 16 -c "$CONNS" -n "$n" -q 2>/dev/null \
    | tr '\r' '\n' | awk '/^INCR: [0-9.]+ requests per second/ { print $2 }' | tail -1)
  kv spread.redis.incr16_rps "$rps"; kv spread.redis.incr16_us "$(us_per3 "$r0" "$(cpu_ticks "$2")" "$n")"
}

spread_mode() {  # redis|sled
  local mode=$1 port rpid="" rport="" max=0 n ids="$WORK/ids-$1"
  port=$(free_port)
  if [ "$mode" = redis ]; then
    start_redis; rpid=$R_PID rport=$R_PORT
    start_node "spread-$mode" "$port" --redis-url "redis://127.0.0.1:$rport/"
    wait_redis_active "$port"
  else
    start_node "spread-$mode" "$port"
  fi
  local pid=$NODE_PID t0
  for n in $SPREAD_NS; do [ "$n" -gt "$max" ] && max=$n; done
  [ "$max" -lt "$CONNS" ] && max=$CONNS
  t0=$(ms_now)
  create_ids "$port" "$max" "$ids"
  kv "spread.$mode.create_s" "$(( ($(ms_now) - t0) / 1000 ))"
  progress "spread $mode: $max sessions created in $(( ($(ms_now) - t0) / 1000 )) s"
  for REP in $(seq 1 "$REPEAT"); do
    spread_run "$mode" "$port" "$pid" "$rpid" "$ids" "$CONNS" uniform hot
    for n in $SPREAD_NS; do
      spread_run "$mode" "$port" "$pid" "$rpid" "$ids" "$n" uniform "uniform_$n"
      spread_run "$mode" "$port" "$pid" "$rpid" "$ids" "$n" zipf "zipf_$n"
    done
    if [ -n "$rpid" ]; then redis_benchmark_runs "$rport" "$rpid"; fi
  done
  REP=1
  if [ "$mode" = redis ]; then
    curl -fs "http://127.0.0.1:$port/api/health" | python3 -c 'import sys,json; n=json.load(sys.stdin)["store"]["near_cache"]; print("spread.redis.near_cache.hits", n["hits"]); print("spread.redis.near_cache.misses", n["misses"])' \
      | while read -r k v; do kv "$k" "$v"; done
  fi
  # What the data directory takes on disk after the creates and the runs
  # (sled: every session; Redis mode: the mirror's copies).
  local data_bytes
  data_bytes=$(du -sb "$WORK/spread-$mode" 2>/dev/null | cut -f1 || true)
  kv "spread.$mode.data_dir_bytes" "$data_bytes"
  progress "spread $mode: data directory $data_bytes bytes with $max sessions"
  stop_pid "$pid"
  if [ -n "$rpid" ]; then stop_pid "$rpid"; fi
}

spread_part() {
  spread_mode redis
  spread_mode sled
}

# --- wear: bytes written and fsyncs per use, paced, data on a real disk -------
# Until write_bytes has stayed put for 11 s (at most 45 s, then a warning):
# longer than two of the node's lazy flushes (every 5 s, counted from the
# end of the last round, so a slow sync stretches the gap past 6 s), so
# the uses a window made are all written by then. A quiet second was not
# enough: a window began before the last flush of the one before it, and
# the 20/s window after the 200/s one was charged that window's last uses
# (58 bytes a use reported in sled mode where the bench now measures 51
# and the node, watched second by second, wrote 41).
settle_writes() {  # pid
  local last now quiet=0
  last=$(write_bytes "$1")
  for _ in $(seq 1 45); do
    sleep 1
    now=$(write_bytes "$1")
    if [ "$now" = "$last" ]; then
      quiet=$((quiet + 1))
      [ "$quiet" -ge 11 ] && return 0
    else
      quiet=0
    fi
    last=$now
  done
  echo "warning: the node's writes did not settle within 45 s; the wear window's bytes may include another window's" >&2
}

# One paced window: strace attached to the node counting fsync-family
# calls, write_bytes read before and after, scripts/bench/paced.py driving
# the load at a fixed rate.
wear_window() {  # mode load pid port kind rate secs [ids n]
  local mode=$1 load=$2 pid=$3 port=$4 kind=$5 rate=$6 secs=$7 ids=${8:-} n=${9:-}
  local b="wear.$mode.$load" spid b0 b1 d0 d1 t0 t1 td fsyncs="" traced=0
  local -a pick=()
  [ -n "$ids" ] && pick=("$ids" "$n")
  settle_writes "$pid"
  strace -f -c -o "$WORK/strace.out" -e trace=fsync,fdatasync,sync_file_range,msync,syncfs,sync \
    -p "$pid" 2>"$WORK/strace.err" &
  spid=$!
  PIDS+=("$spid")
  for _ in $(seq 1 300); do
    if [ "$(proc_field "$pid" TracerPid)" != 0 ]; then traced=1; break; fi
    kill -0 "$spid" 2>/dev/null || break
    sleep 0.01
  done
  sleep 0.3  # -f attaches to the node's other threads after the first
  d0=$(device_bytes)
  b0=$(write_bytes "$pid"); t0=$(ms_now)
  if [ "$kind" = idle ]; then
    sleep "$secs"
    printf 'ok=0\nachieved_rate=0\nlate=0\nerrors=0\n' >"$PACED_OUT"
  else
    python3 scripts/bench/paced.py "$port" "$kind" "$rate" "$secs" "${pick[@]}" >"$PACED_OUT"
  fi
  t1=$(ms_now)
  # The window's bytes include the flush that writes its last uses, and
  # its fsyncs that flush's sync: both are counted over the window and the
  # wait for it (device_s).
  settle_writes "$pid"
  b1=$(write_bytes "$pid")
  d1=$(device_bytes); td=$(ms_now)
  if [ "$traced" = 1 ] && kill -INT "$spid" 2>/dev/null; then
    wait "$spid" 2>/dev/null || true
    fsyncs=$(awk '$NF ~ /^(fsync|fdatasync|sync_file_range|msync|syncfs|sync)$/ { s += $4 } END { print s + 0 }' "$WORK/strace.out")
  else
    wait "$spid" 2>/dev/null || true
    echo "warning: strace could not attach to the node (fsyncs not counted): $(cat "$WORK/strace.err")" >&2
  fi
  local ok achieved late errors
  ok=$(awk -F= '$1 == "ok" { print $2 }' "$PACED_OUT")
  achieved=$(awk -F= '$1 == "achieved_rate" { print $2 }' "$PACED_OUT")
  late=$(awk -F= '$1 == "late" { print $2 }' "$PACED_OUT")
  errors=$(awk -F= '$1 == "errors" { print $2 }' "$PACED_OUT")
  [ "$errors" != 0 ] && echo "warning: wear $mode $load: $errors requests failed" >&2
  kv "$b.target_rate" "$rate"; kv "$b.achieved_rate" "$achieved"; kv "$b.late" "$late"; kv "$b.errors" "$errors"
  kv "$b.bytes" "$(( b1 - b0 ))"
  if [ -n "$d0" ] && [ -n "$d1" ]; then kv "$b.device_bytes" "$(( d1 - d0 ))"; fi
  kv "$b.window_s" "$(python3 -c "print(($t1 - $t0) / 1000)")"
  kv "$b.device_s" "$(python3 -c "print(($td - $t0) / 1000)")"
  case "$kind" in
    use) kv "$b.uses" "$ok" ;;
    create) kv "$b.creates" "$ok" ;;
  esac
  [ -n "$fsyncs" ] && kv "$b.fsyncs" "$fsyncs"
  progress "wear $mode $load (repeat $REP): $achieved/s achieved of $rate/s ($late late), $(( b1 - b0 )) bytes written (device: $(( ${d1:-0} - ${d0:-0} ))), ${fsyncs:-?} fsyncs in $(( (t1 - t0) / 1000 )) s"
}

wear_mode() {  # redis|sled
  local mode=$1 port rpid="" ids="$WORK/wear-ids-$1" rate
  port=$(free_port)
  mkdir -p "$WEAR_ROOT/$mode"
  if [ "$mode" = redis ]; then
    start_redis; rpid=$R_PID
    NODE_DIR="$WEAR_ROOT/$mode" start_node "wear-$mode" "$port" --redis-url "redis://127.0.0.1:$R_PORT/"
    wait_redis_active "$port"
  else
    NODE_DIR="$WEAR_ROOT/$mode" start_node "wear-$mode" "$port"
  fi
  local pid=$NODE_PID
  create_ids "$port" "$WEAR_SESSIONS" "$ids"
  # The first uses after the creates make the node write much more than
  # later ones (measured: ~0.5 MB/s in Redis mode for a minute or more after
  # 10 000 creates, against ~0.01-0.1 MB/s later): a window at the highest
  # rate first, reported apart, so the use windows see the steady state.
  local top=0
  for rate in $WEAR_RATES; do [ "$rate" -gt "$top" ] && top=$rate; done
  if [ "$WEAR_WARMUP_SECS" -gt 0 ]; then
    wear_window "$mode" "warmup_$top" "$pid" "$port" use "$top" "$WEAR_WARMUP_SECS" "$ids" "$WEAR_SESSIONS"
  fi
  for REP in $(seq 1 "$REPEAT"); do
    for rate in $WEAR_RATES; do
      wear_window "$mode" "use_$rate" "$pid" "$port" use "$rate" "$WEAR_SECS" "$ids" "$WEAR_SESSIONS"
    done
    wear_window "$mode" create "$pid" "$port" create "$CREATE_RATE" "$CREATE_SECS"
    # Nothing at all: what the node writes and syncs on its own.
    wear_window "$mode" idle "$pid" "$port" idle 0 "$WEAR_IDLE_SECS"
  done
  REP=1
  stop_pid "$pid"
  if [ -n "$rpid" ]; then stop_pid "$rpid"; fi
}

wear_part() {
  mkdir -p "$WEAR_DIR"
  local fs
  fs=$(stat -f -c %T "$WEAR_DIR")
  case "$fs" in
    tmpfs | ramfs)
      echo "bench.sh: wear: $WEAR_DIR is $fs, where write_bytes reads 0; set WEAR_DIR to a directory on a disk. Wear not measured." >&2
      WEAR_FS="$fs (refused)"
      return 0 ;;
  esac
  WEAR_ROOT=$(mktemp -d "$WEAR_DIR/edgenode-wear.XXXXXX")
  WEAR_FS=$fs
  WEAR_STAT=$(wear_device_stat)
  # What the bench itself writes inside a window goes to memory when it can,
  # so the device figures hold only the node's writes.
  PACED_OUT="$WORK/paced.out"
  if [ "$(stat -f -c %T /dev/shm 2>/dev/null)" = tmpfs ]; then
    PACED_OUT=$(mktemp /dev/shm/edgenode-bench-paced.XXXXXX)
  fi
  if [ -n "$WEAR_STAT" ]; then
    device_background before
  else
    echo "bench.sh: wear: $WEAR_DIR has no block device of its own to read; device figures not measured" >&2
  fi
  wear_mode redis
  wear_mode sled
  if [ -n "$WEAR_STAT" ]; then device_background after; fi
}

# What the device writes with no node running (the system's own writers),
# before and after the modes: report.py subtracts the lower rate of the two
# from each window's device figure (one burst from elsewhere in one of them
# would otherwise be taken off every window).
device_background() {  # before|after
  local d0 d1 t0
  d0=$(device_bytes); t0=$(ms_now)
  sleep "$WEAR_IDLE_SECS"
  d1=$(device_bytes)
  kv "wear.device.background_$1.bytes" "$(( d1 - d0 ))"
  kv "wear.device.background_$1.s" "$(python3 -c "print(($(ms_now) - $t0) / 1000)")"
  progress "wear: the device under $WEAR_DIR ($WEAR_STAT) wrote $(( d1 - d0 )) bytes in $WEAR_IDLE_SECS s with no node running ($1)"
}

# --- the run -----------------------------------------------------------------
echo "edgenode bench: $(nproc) cores, wrk ${DURATION}s at $CONNS connections, binary $BIN ($("$BIN" --version)), parts: $ONLY, repeat $REPEAT$([ "$QUICK" = 1 ] && echo ", QUICK smoke run")"
echo
if runs touch; then touch_part; fi
if runs memory; then memory_part; fi
WEAR_FS=""
WEAR_STAT=""
if runs spread; then spread_part; fi
if runs wear; then wear_part; fi
if runs spread || runs wear; then
  echo "spread: N in {$SPREAD_NS}, Zipf s=$ZIPF_S; wear: data under $WEAR_DIR (${WEAR_FS:-not run}), $WEAR_SESSIONS sessions, uses at {$WEAR_RATES}/s for ${WEAR_SECS}s, creates at $CREATE_RATE/s for ${CREATE_SECS}s, idle ${WEAR_IDLE_SECS}s, first uses ${WEAR_WARMUP_SECS}s"
  echo
fi
if [ -n "${BENCH_KV:-}" ]; then cp "$KV" "$BENCH_KV"; fi
python3 scripts/bench/report.py "$KV"
