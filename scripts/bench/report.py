"""Report of scripts/bench.sh's spread and wear parts, and the key=value
lines of every part.

    report.py KV_FILE

KV_FILE holds one measurement a line, "REPEAT KEY VALUE", as bench.sh
records them (REPEAT numbers the repetition, 1 when a part runs once).
Ratios are taken within a repetition (a spread run against the hot run of
the same mode and repetition), then summarised: the human table shows the
median and, with REPEAT > 1, the min-max; the key=value lines give
KEY=median and, when repeated, KEY.min, KEY.max and KEY.n, so a later run
of the script (or a person) can take medians across runs.
"""
import re
import statistics
import sys
from collections import OrderedDict

MB = 1024  # kB per MB, as the rest of bench.sh reports RSS


def load(path):
    data = OrderedDict()  # key -> {rep: value}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) != 3:
                continue
            rep, key, value = parts
            try:
                v = float(value)
            except ValueError:
                continue
            data.setdefault(key, {})[int(rep)] = v
    return data


def derive(data):
    """Adds the per-repetition ratios and per-use figures."""
    def put(key, rep, v):
        data.setdefault(key, {})[rep] = v

    keys = list(data)
    bg_rate = background_rate(data)
    for key in keys:
        m = re.match(r"spread\.(\w+)\.((?:uniform|zipf)_\d+|hot)\.rps$", key)
        if m:
            mode, shape = m.groups()
            base = f"spread.{mode}.{shape}."
            hot = f"spread.{mode}.hot."
            for rep, rps in data[key].items():
                h = data.get(hot + "rps", {}).get(rep)
                if h and shape != "hot":
                    put(base + "rps_ratio", rep, rps / h)
                nu, hn = data.get(base + "node_us", {}).get(rep), data.get(hot + "node_us", {}).get(rep)
                if nu is not None and hn and shape != "hot":
                    put(base + "node_cpu_ratio", rep, nu / hn)
                ru = data.get(base + "redis_us", {}).get(rep)
                g = data.get(f"spread.{mode}.get_us", {}).get(rep)
                i = data.get(f"spread.{mode}.incr16_us", {}).get(rep)
                if ru is not None and g:
                    put(base + "redis_get_ratio", rep, ru / g)
                if ru is not None and i:
                    put(base + "redis_incr16_ratio", rep, ru / i)
        m = re.match(r"wear\.(\w+)\.((?:use|warmup)_(\d+)|create|idle)\.bytes$", key)
        if m:
            mode, load_, rate = m.groups()
            base = f"wear.{mode}.{load_}."
            count_key = base + ("uses" if rate else "creates" if load_ == "create" else "-")
            for rep, b in data[key].items():
                n = data.get(count_key, {}).get(rep)
                w = data.get(base + "window_s", {}).get(rep)
                f = data.get(base + "fsyncs", {}).get(rep)
                if n:
                    per = b / n
                    put(base + ("bytes_per_use" if rate else "bytes_per_create"), rep, per)
                    if rate:
                        put(base + "mb_per_day", rep, per * float(rate) * 86400 / 1e6)
                # strace and write_bytes run until the window's last flush
                # (device_s), so rates are over that time.
                dw = data.get(base + "device_s", {}).get(rep) or w
                if dw and f is not None:
                    put(base + "fsync_per_s", rep, f / dw)
                # What the device wrote in the window (and the wait for its
                # last flush), less the background rate it showed with no
                # node running.
                d = data.get(base + "device_bytes", {}).get(rep)
                if d is not None and dw and bg_rate is not None:
                    net = max(0.0, d - bg_rate * dw)
                    put(base + "device_net_bytes", rep, net)
                    if n:
                        put(base + ("device_bytes_per_use" if rate else "device_bytes_per_create"), rep, net / n)


def background_rate(data):
    """What the wear device wrote a second with no node running: the lower
    of the windows before and after the modes."""
    rates = []
    for when in ("before", "after"):
        b = med(data, f"wear.device.background_{when}.bytes")
        s = med(data, f"wear.device.background_{when}.s")
        if b is not None and s:
            rates.append(b / s)
    return min(rates) if rates else None


def med(data, key):
    vals = list(data.get(key, {}).values())
    return statistics.median(vals) if vals else None


def cell(data, key, fmt="{:.0f}", scale=1.0, spread=True):
    """The median, and with more than one value its [min-max]."""
    vals = sorted(v * scale for v in data.get(key, {}).values())
    if not vals:
        return "-"
    s = fmt.format(statistics.median(vals))
    if spread and len(vals) > 1:
        s += " [" + fmt.format(vals[0]) + "-" + fmt.format(vals[-1]) + "]"
    return s


def shapes(data, mode):
    found = []
    for key in data:
        m = re.match(rf"spread\.{mode}\.((?:uniform|zipf)_(\d+)|hot)\.rps$", key)
        if m and m.group(1) not in found:
            found.append(m.group(1))
    hot = [s for s in found if s == "hot"]
    rest = sorted((s for s in found if s != "hot"), key=lambda s: (int(s.split("_")[1]), s))
    return hot + rest


def spread_table(data):
    rows, misses = [], []
    sizes = [int(s.split("_")[1]) for m in ("redis", "sled") for s in shapes(data, m) if s != "hot"]
    biggest = max(sizes) if sizes else 0
    for mode in ("redis", "sled"):
        for shape in shapes(data, mode):
            b = f"spread.{mode}.{shape}."
            label = "hot (64/conn)" if shape == "hot" else shape.replace("_", " ")
            if shape == "hot":
                label = "hot"
            checks = []
            if shape != "hot":
                r = med(data, b + "rps_ratio")
                if mode == "redis" or int(shape.split("_")[1]) == biggest:
                    checks.append(("req/s>=0.6x hot", r is not None and r >= 0.6))
                if mode == "redis":
                    c = med(data, b + "node_cpu_ratio")
                    checks.append(("node CPU<=1.5x hot", c is not None and c <= 1.5))
                    g = med(data, b + "redis_get_ratio")
                    checks.append(("redis CPU<=0.5x GET", g is not None and g <= 0.5))
                    p = med(data, b + "p99_ms")
                    checks.append(("p99<=5ms", p is not None and p <= 5))
                    x = med(data, b + "rss_max_kb")
                    checks.append(("RSS<32MB", x is not None and x < 32 * MB))
            missed = [name for name, ok in checks if not ok]
            verdict = "-" if not checks else ("met" if not missed else "MISSED " + ", ".join(missed))
            if missed:
                misses.append(f"{mode} {label}: " + ", ".join(missed))
            rows.append([
                mode, label,
                cell(data, b + "rps"), cell(data, b + "rps_ratio", "{:.2f}"),
                cell(data, b + "p99_ms", "{:.2f}"),
                cell(data, b + "node_us", "{:.1f}"), cell(data, b + "node_cpu_ratio", "{:.2f}"),
                cell(data, b + "redis_us", "{:.2f}"), cell(data, b + "redis_get_ratio", "{:.2f}"),
                cell(data, b + "redis_incr16_ratio", "{:.2f}"),
                cell(data, b + "rss_end_kb", "{:.1f}", 1 / MB) + " / " + cell(data, b + "rss_max_kb", "{:.1f}", 1 / MB),
                verdict,
            ])
    head = ["mode", "shape", "req/s", "x hot", "p99 ms", "node us/use", "x hot",
            "redis us/use", "x GET", "x INCR-P16", "RSS end/max MB", "targets"]
    return head, rows, misses


def wear_table(data):
    rows, misses = [], []
    for mode in ("redis", "sled"):
        loads = []
        for key in data:
            m = re.match(rf"wear\.{mode}\.((?:use|warmup)_\d+|create|idle)\.bytes$", key)
            if m and m.group(1) not in loads:
                loads.append(m.group(1))
        order = {"warmup": 0, "use": 1, "create": 2, "idle": 3}
        loads.sort(key=lambda s: (order[s.split("_")[0]], int(s.split("_")[1]) if "_" in s else 0))
        for ld in loads:
            b = f"wear.{mode}.{ld}."
            checks = []
            if ld == "idle":
                label = "idle"
                w = med(data, b + "window_s")
                byt = med(data, b + "bytes")
                dw = med(data, b + "device_s") or w
                per = "-" if not dw else f"{byt / dw:.0f} B/s"
                dn = med(data, b + "device_net_bytes")
                dev = "-" if not dw or dn is None else f"{dn / dw:.0f} B/s"
                day = "-" if not dw else f"{byt / dw * 86400 / 1e6:.1f}"
            elif ld == "create":
                label = "creates"
                per = cell(data, b + "bytes_per_create", "{:.0f}")
                dev = cell(data, b + "device_bytes_per_create", "{:.0f}")
                if mode == "redis":
                    v = med(data, b + "bytes_per_create")
                    checks.append(("<=1 KB/create", v is not None and v <= 1024))
                    dv = med(data, b + "device_bytes_per_create")
                    if dv is not None and v:
                        checks.append(("<=1 KB/create on the device", dv <= 1024))
                day = "-"
            elif ld.startswith("warmup_"):
                # The first uses after the sessions were made flat out: the
                # node is still writing what the creates left; no target.
                label = "uses, first"
                per = cell(data, b + "bytes_per_use", "{:.1f}")
                dev = cell(data, b + "device_bytes_per_use", "{:.1f}")
                day = cell(data, b + "mb_per_day", "{:.1f}")
            else:
                label = "uses"
                per = cell(data, b + "bytes_per_use", "{:.1f}")
                dev = cell(data, b + "device_bytes_per_use", "{:.1f}")
                v = med(data, b + "bytes_per_use")
                dv = med(data, b + "device_bytes_per_use")
                f = med(data, b + "fsync_per_s")
                limit = 10 if mode == "redis" else 60
                checks.append((f"<={limit} B/use", v is not None and v <= limit))
                # The device figure is the whole system's: a window in which
                # the node dirtied no page is not the node's doing.
                if dv is not None and v:
                    checks.append((f"<={limit} B/use on the device", dv <= limit))
                if mode == "redis":
                    checks.append(("<=1 fsync/5s", f is not None and f <= 0.2))
                day = cell(data, b + "mb_per_day", "{:.1f}")
            missed = [n for n, ok in checks if not ok]
            verdict = "-" if not checks else ("met" if not missed else "MISSED " + ", ".join(missed))
            if missed:
                misses.append(f"{mode} {ld}: " + ", ".join(missed))
            rows.append([
                mode, label, cell(data, b + "target_rate", "{:.0f}", spread=False),
                cell(data, b + "achieved_rate", "{:.1f}"), cell(data, b + "window_s", "{:.0f}", spread=False), per, dev,
                cell(data, b + "fsync_per_s", "{:.2f}"), day, verdict,
            ])
    head = ["mode", "load", "rate/s", "achieved/s", "window s", "write_bytes each", "device each", "fsync/s",
            "MB/day", "targets"]
    return head, rows, misses


def print_table(head, rows):
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    for r in [head] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def main():
    data = load(sys.argv[1])
    derive(data)
    misses = []
    if any(k.startswith("spread.") for k in data):
        head, rows, m = spread_table(data)
        print("== spread traffic: GET /api/session, each request a random one of N sessions "
              "(uniform, or Zipf s=1 by rank); hot = 64 sessions, as many as connections")
        print("   medians [min-max] over the repetitions; ratios taken within a repetition")
        print_table(head, rows)
        print("   targets (Redis mode): req/s >= 0.6x hot, node CPU/use <= 1.5x hot, Redis CPU/use <= 0.5x a "
              "redis-benchmark GET, p99 <= 5 ms, RSS < 32 MB; sled mode at the largest N: req/s >= 0.6x hot")
        for mode in ("redis",):
            g, i = f"spread.{mode}.get_", f"spread.{mode}.incr16_"
            if g + "rps" in data:
                print(f"   redis-benchmark on the same Redis: GET {cell(data, g + 'rps')} /s, "
                      f"{cell(data, g + 'us', '{:.2f}')} us Redis CPU each; INCR -P 16 {cell(data, i + 'rps')} /s, "
                      f"{cell(data, i + 'us', '{:.3f}')} us each (the pipelined floor)")
        misses += m
        print()
    if any(k.startswith("wear.") for k in data):
        head, rows, m = wear_table(data)
        print("== SD-card wear: paced uses over the wear sessions and paced creates; node write_bytes "
              "(/proc/<pid>/io) and fsync-family calls (strace -c) in the window")
        bg = background_rate(data)
        if bg is not None:
            print(f"   device each: what the block device wrote in the window (sync at both ends) less "
                  f"{bg:.0f} B/s, what it wrote with no node running; the whole system's writes, "
                  f"judged only where the node's write_bytes is not 0")
        else:
            print("   device each: not measured (no block device of its own under the wear directory)")
        print_table(head, rows)
        print("   targets: Redis mode <= 10 bytes/use and <= 1 fsync per 5 s while only using; "
              "sled mode <= 60 bytes/use; a create in Redis mode <= 1 KB, each judged on write_bytes and on "
              "the device. MB/day = write_bytes/use x rate x 86 400")
        misses += m
        print()
    print("== key=value (median; .min/.max/.n when repeated)")
    for key, vals in data.items():
        v = sorted(vals.values())
        print(f"{key}={fmt(statistics.median(v))}")
        if len(v) > 1:
            print(f"{key}.min={fmt(v[0])}")
            print(f"{key}.max={fmt(v[-1])}")
            print(f"{key}.n={len(v)}")
    if misses:
        print()
        print("targets missed (medians): " + "; ".join(misses))


def fmt(v):
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.4g}" if abs(v) < 1 else f"{v:.2f}"


if __name__ == "__main__":
    main()
