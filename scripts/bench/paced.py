"""Paced load for the wear measurements of scripts/bench.sh: requests at a
fixed rate, not flat out (wrk2, which paces, is not in Debian).

    paced.py PORT use|create RATE SECONDS [IDS_FILE N]

use     GET /api/session with the cookie of a random one (uniform) of the
        first N ids of IDS_FILE: a browser coming back now and then;
create  POST /api/sessions.

Request i is due at start + i / RATE. A few threads, each on its own
keep-alive connection, take the due times in turn; a thread that is behind
sends at once (no catching up in bursts beyond that). Prints key=value
lines: sent, ok (2xx), the achieved rate (ok answers / elapsed), how many
were sent more than 50 ms late, the worst lateness.
"""
import http.client
import random
import sys
import threading
import time

THREADS = 4


def main():
    port, kind, rate, seconds = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    ids = []
    if kind == "use":
        want = int(sys.argv[6])
        with open(sys.argv[5]) as f:
            ids = [line.strip() for line in f if line.strip()][:want]
        if len(ids) < want:
            sys.exit(f"paced.py: {sys.argv[5]} holds {len(ids)} ids, {want} wanted")
    total = int(rate * seconds)
    lock = threading.Lock()
    stats = {"sent": 0, "ok": 0, "late": 0, "max_late": 0.0, "errors": 0}
    start = time.monotonic() + 0.1

    def worker(k):
        rnd = random.Random(k * 7919 + time.time_ns())
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for i in range(k, total, THREADS):
            due = start + i / rate
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            lateness = time.monotonic() - due
            try:
                if kind == "use":
                    conn.request("GET", "/api/session",
                                 headers={"Cookie": "session_id=" + rnd.choice(ids)})
                else:
                    conn.request("POST", "/api/sessions",
                                 body='{"user_id":"w%d","metadata":{"cart":[1,2,3]}}' % (i % 5000),
                                 headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                good = 200 <= resp.status < 300
            except (OSError, http.client.HTTPException):
                good = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            with lock:
                stats["sent"] += 1
                stats["ok"] += good
                stats["errors"] += not good
                if lateness > 0.05:
                    stats["late"] += 1
                stats["max_late"] = max(stats["max_late"], lateness)
        conn.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    print(f"sent={stats['sent']}")
    print(f"ok={stats['ok']}")
    print(f"errors={stats['errors']}")
    print(f"elapsed_s={elapsed:.3f}")
    print(f"achieved_rate={stats['ok'] / max(elapsed, 1e-9):.2f}")
    print(f"late={stats['late']}")
    print(f"max_late_ms={stats['max_late'] * 1000:.1f}")


if __name__ == "__main__":
    main()
