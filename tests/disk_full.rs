//! A full SD card never wedges, hangs or logs anyone out (issue 21).
//!
//! The node's data directory is a small tmpfs this test mounts (root only;
//! elsewhere it prints `SKIPPED:` and returns), mostly taken by a ballast
//! file so that a few MB are left. Each cycle starts a node on it (alone,
//! or with Redis killed before the fill so the node serves from its disk in
//! fallback), and:
//! 1. fills the disk with creates from four writers until they are refused
//!    (507 or 503), no request taking longer than a bound; the records'
//!    sizes are the cycle's [`Load`]: small ones (sled meets ENOSPC on a log
//!    write), 6-15 KB with small ones (either), or some over 64 KB (each one
//!    a blob file by itself: ENOSPC on a blob write);
//! 2. checks that stored sessions are still served (200, never 404);
//! 3. frees the space (the ballast goes) and wants the node ready again
//!    within a second, and a create to succeed;
//! 4. stops it with SIGTERM, which must end with exit 0 within the grace
//!    (else the cycle fails, and the node is killed);
//! 5. restarts it on the same directory and reads back every create that
//!    was acknowledged in the cycle; the database is then removed, so that
//!    every cycle starts from the same empty disk.
//!
//! Every third cycle runs a node with a reserve (`min_free_mb` 1: the
//! reserve must hold, sled must never meet ENOSPC), the others one without
//! (sled meets ENOSPC on a log or a blob write: the node must still
//! behave), in sled mode and Redis mode by turns. Each cycle reports which
//! write path failed, as the patched sled names it; a cycle without a
//! reserve takes the load of the path hit less often so far. The run goes
//! on (up to twice the cycles) until both the log and the blob path were
//! hit at least three times, and fails if not.
//! `EDGENODE_DISK_FULL_CYCLES` raises the number of cycles (default 9).

mod common;

use common::{Client, Node, Redis};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const GRACE_MS: u64 = 3000;
/// A request that takes longer than this is a hang.
const REQUEST_BOUND: Duration = Duration::from_secs(8);
/// What the ballast leaves free at the start of a cycle.
const ROOM: u64 = 5 << 20;
/// Ready again after space returns (issue 21: "within a second"):
/// housekeeping tries every 50 ms while the disk is faulty, a try while it
/// is still full costs a statvfs, and the reopen itself (sled reads its
/// log) takes 30-400 ms on this shared 2-core box. Each cycle prints the
/// figure.
const READY_BOUND_MS: u128 = 1000;

struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, mb: u64) -> Result<Tmpfs, String> {
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount ({e})"))?;
        if !out.status.success() {
            return Err(format!(
                "cannot mount a tmpfs here ({}); this test needs root",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

fn available(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).expect("path");
    // SAFETY: statvfs fills the zeroed struct we own from a valid C string.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        assert_eq!(libc::statvfs(path.as_ptr(), &mut st), 0, "statvfs");
        (st.f_bavail as u64) * (st.f_frsize as u64)
    }
}

/// Grows the ballast file until `leave` bytes are left free.
fn ballast(dir: &Path, leave: u64) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("ballast"))
        .expect("ballast");
    let chunk = vec![0u8; 64 << 10];
    while available(dir) > leave + chunk.len() as u64 {
        f.write_all(&chunk).expect("ballast write");
    }
    f.sync_all().ok();
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hit {
    Log,
    Blob,
    /// Refused at the reserve; sled met no ENOSPC.
    Reserve,
    Other,
}

/// Which sled write failed, from the node's log (the patched sled names it).
fn hit_in(log: &str) -> Hit {
    let log_at = log.find("sled log write");
    let blob_at = log.find("sled blob write");
    match (log_at, blob_at) {
        (Some(l), Some(b)) if l < b => Hit::Log,
        (Some(_), Some(_)) => Hit::Blob,
        (Some(_), None) => Hit::Log,
        (None, Some(_)) => Hit::Blob,
        (None, None) if log.contains("disk almost full") => Hit::Reserve,
        (None, None) => Hit::Other,
    }
}

/// What the writers of a cycle create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Load {
    /// Metadata of 200-1200 bytes: sled's leaves stay under its blob
    /// threshold, so a full disk meets a log write.
    Small,
    /// 6-15 KB, every third one small: a consolidated leaf may go to a
    /// blob file, or the log buffer fills first.
    Mixed,
    /// 6-15 KB, every third one 70-100 KB (a blob file by itself): the
    /// full disk nearly always meets a blob write.
    Huge,
}

/// The largest metadata a load makes, with room for its JSON.
const MAX_METADATA: &str = "110000";
const MAX_BODY: &str = "131072";

/// Metadata for the `n`th create under `load`, different for every create.
fn metadata(load: Load, n: u64) -> String {
    let spread = n.wrapping_mul(2_654_435_761);
    let len = match (load, n % 3) {
        (Load::Small, _) | (Load::Mixed, 2) => 200 + (spread % 1_000) as usize,
        (Load::Huge, 2) => 70_000 + (spread % 30_000) as usize,
        (Load::Mixed | Load::Huge, _) => 6_000 + (spread % 9_000) as usize,
    };
    let fill = char::from(b'a' + (n % 26) as u8).to_string().repeat(len);
    format!(
        r#"{{"user_id":"u{}","metadata":{{"n":{n},"pad":"{fill}"}}}}"#,
        n % 97
    )
}

struct Fill {
    acked: Vec<String>,
    refused: u64,
    slowest: Duration,
}

/// Four writers create sessions until each was refused five times in a row.
fn fill(base: &str, counter: &Arc<AtomicU64>, load: Load) -> Fill {
    let acked = Arc::new(Mutex::new(Vec::new()));
    let refused = Arc::new(AtomicU64::new(0));
    let slowest = Arc::new(Mutex::new(Duration::ZERO));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|_| {
            let (acked, refused, slowest, stop, counter) = (
                acked.clone(),
                refused.clone(),
                slowest.clone(),
                stop.clone(),
                counter.clone(),
            );
            let client = Client::new(base).with_timeout(Duration::from_secs(30));
            std::thread::spawn(move || {
                let mut in_a_row = 0;
                let started = Instant::now();
                while in_a_row < 5 && !stop.load(Ordering::Relaxed) {
                    assert!(
                        started.elapsed() < Duration::from_secs(60),
                        "the disk never filled"
                    );
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    let t = Instant::now();
                    let a = client
                        .try_request("POST", "/api/sessions", &[], Some(&metadata(load, n)))
                        .unwrap_or_else(|e| panic!("create failed outright: {e}"));
                    let took = t.elapsed();
                    {
                        let mut s = slowest.lock().unwrap();
                        *s = (*s).max(took);
                    }
                    match a.status {
                        201 => {
                            in_a_row = 0;
                            let id = a.json()["session_id"].as_str().unwrap().to_string();
                            acked.lock().unwrap().push(id);
                        }
                        507 | 503 => {
                            in_a_row += 1;
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        other => panic!("create answered {other}: {}", a.text),
                    }
                }
            })
        })
        .collect();
    let mut panicked = None;
    for w in writers {
        if let Err(p) = w.join() {
            stop.store(true, Ordering::Relaxed);
            panicked = Some(p);
        }
    }
    if let Some(p) = panicked {
        std::panic::resume_unwind(p);
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    let slowest = *slowest.lock().unwrap();
    Fill {
        acked,
        refused: refused.load(Ordering::Relaxed),
        slowest,
    }
}

/// Every id must be served (200), or with `faults_allowed` answered 503
/// `disk_fault` (a read that sled cannot serve from a database whose write
/// failed): never 404, a full disk logs nobody out. Returns how many were
/// answered 503.
fn all_served(
    client: &Client,
    ids: &[String],
    when: &str,
    faults_allowed: bool,
) -> Result<usize, String> {
    let mut faults = 0;
    for id in ids {
        let a = client
            .try_request("GET", &format!("/api/sessions/{id}"), &[], None)
            .map_err(|e| format!("{when}: GET {id}: {e}"))?;
        match a.status {
            200 => {}
            503 if faults_allowed && a.code() == "disk_fault" => faults += 1,
            _ => {
                return Err(format!(
                    "{when}: stored session {id} answered {} {}",
                    a.status, a.text
                ))
            }
        }
    }
    Ok(faults)
}

#[test]
fn a_full_disk_never_wedges_hangs_or_logs_anyone_out() {
    let long = std::env::var("EDGENODE_DISK_FULL_CYCLES").ok();
    let cycles: usize = long.as_deref().and_then(|v| v.parse().ok()).unwrap_or(9);
    let top = common::tempdir();
    let mnt = top.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let _tmpfs = match Tmpfs::mount(&mnt, 96) {
        Ok(t) => t,
        Err(why) => {
            common::skip(&why);
            return;
        }
    };
    let started = Instant::now();
    let mut redis = Redis::start(false);
    let redis_url = redis.url();
    let mut redis_killed = false;
    let counter = Arc::new(AtomicU64::new(0));
    let mut acked: Vec<String> = Vec::new();
    let mut total_acked = 0;
    let mut hits: Vec<(usize, &str, Load, Hit)> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    let mut cycle = 0;
    loop {
        let count = |h: Hit| hits.iter().filter(|(.., x)| *x == h).count();
        let (logs, blobs) = (count(Hit::Log), count(Hit::Blob));
        if cycle >= cycles && ((logs >= 3 && blobs >= 3) || cycle >= cycles * 2) {
            break;
        }
        let redis_mode = cycle % 2 == 1;
        let reserve = cycle % 3 == 2;
        let mode = if redis_mode { "redis" } else { "sled" };
        let load = match logs.cmp(&blobs) {
            _ if reserve => Load::Mixed,
            std::cmp::Ordering::Less => Load::Small,
            std::cmp::Ordering::Greater => Load::Huge,
            std::cmp::Ordering::Equal => Load::Mixed,
        };
        // Small records take many more creates to fill the same room.
        ballast(&mnt, if load == Load::Small { ROOM / 2 } else { ROOM });
        let mut b = Node::builder()
            .data_dir(&mnt)
            .args(["--max-metadata-bytes", MAX_METADATA])
            .args(["--max-body-bytes", MAX_BODY])
            .args(["--min-free-mb", if reserve { "1" } else { "0" }])
            .args(["--shutdown-grace-ms", &GRACE_MS.to_string()])
            .args(["--drain-delay-ms", "0"])
            .args(["--request-timeout-ms", "10000"])
            .args(["--create-rate-per-ip", "0"])
            .args(["--cache-capacity-mb", "8"]);
        if redis_mode {
            b = b.args(["--redis-url", &redis_url, "--store-timeout-ms", "200"]);
        }
        let mut node = b.start();
        if redis_mode && !redis_killed {
            redis.kill9();
            redis_killed = true;
        }
        let client = node.client().with_timeout(Duration::from_secs(30));
        let log_from = node.log_text().len();

        // 1. Fill.
        let filled = fill(&node.url(), &counter, load);
        let new = filled.acked.clone();
        acked.extend(filled.acked);
        let health = client.get("/api/health").json();
        let log = node.log_text();
        let hit = hit_in(&log[log_from.min(log.len())..]);
        let free = available(&mnt);
        println!(
            "cycle {cycle} ({mode}, {}, {load:?} load): {} created, {} refused, slowest {} ms, sled hit: {hit:?}, {} KiB free; health: {}",
            if reserve { "reserve 1 MB" } else { "no reserve" },
            new.len(),
            filled.refused,
            filled.slowest.as_millis(),
            free / 1024,
            health["degraded_reason"],
        );
        if filled.slowest > REQUEST_BOUND {
            failures.push(format!(
                "cycle {cycle}: a create took {} ms",
                filled.slowest.as_millis()
            ));
        }
        if reserve {
            if matches!(hit, Hit::Log | Hit::Blob) {
                failures.push(format!(
                    "cycle {cycle}: the reserve did not hold: sled met ENOSPC ({hit:?})"
                ));
            }
            if free < 1 << 20 {
                failures.push(format!(
                    "cycle {cycle}: {free} bytes free, below the 1 MB reserve"
                ));
            }
        } else {
            hits.push((cycle, mode, load, hit));
        }

        // The shared cache on the full disk: its disk tier's faults are
        // misses and values left to memory, never an error answer.
        let mut cache_answers = Vec::new();
        for k in 0..10 {
            let path = format!("/api/cache/full/k{cycle}-{k}");
            let put = client
                .try_request(
                    "PUT",
                    &format!("{path}?ttl=60"),
                    &[],
                    Some(&"v".repeat(2_000)),
                )
                .map(|a| a.status)
                .unwrap_or_else(|e| panic!("cache PUT failed outright: {e}"));
            let get = client
                .try_request("GET", &path, &[], None)
                .map(|a| a.status)
                .unwrap_or_else(|e| panic!("cache GET failed outright: {e}"));
            cache_answers.push((put, get));
        }
        let disk_errors = client.get("/api/health").json()["cache"]["disk_errors"].clone();
        println!("cycle {cycle}: cache PUT/GET while full: {cache_answers:?}; cache.disk_errors {disk_errors}");
        if cache_answers
            .iter()
            .any(|&(p, g)| !matches!(p, 202 | 204 | 507 | 503) || !matches!(g, 200 | 404))
        {
            failures.push(format!(
                "cycle {cycle}: cache answers on the full disk: {cache_answers:?}"
            ));
        }

        // 2. Stored sessions are served while the disk is full.
        let sample: Vec<String> = new
            .iter()
            .rev()
            .take(40)
            .chain(acked.iter().step_by(17).take(40))
            .cloned()
            .collect();
        // At the reserve every one is served; past it (sled met ENOSPC) a
        // read sled cannot serve is a disk fault (503), never a 404.
        match all_served(&client, &sample, "disk full", !reserve) {
            Ok(faults) => println!(
                "cycle {cycle}: {} stored sessions used while full: {} answered 200, {faults} 503",
                sample.len(),
                sample.len() - faults
            ),
            Err(e) => failures.push(format!("cycle {cycle}: {e}")),
        }

        // 3. Space back: ready within a second, creates work.
        std::fs::remove_file(mnt.join("ballast")).unwrap();
        let freed = Instant::now();
        let ready = common::wait_until(Duration::from_secs(10), || {
            client
                .try_request("GET", "/api/ready", &[], None)
                .is_ok_and(|a| a.status == 200)
        });
        let ready_ms = freed.elapsed().as_millis();
        println!("cycle {cycle}: ready {ready_ms} ms after the space was freed");
        if !ready || ready_ms > READY_BOUND_MS {
            failures.push(format!(
                "cycle {cycle}: not ready within a second of space returning ({ready_ms} ms): {}",
                client.get("/api/health").text
            ));
        }
        let a = client.post(
            "/api/sessions",
            &metadata(load, counter.fetch_add(1, Ordering::Relaxed)),
        );
        if a.status == 201 {
            acked.push(a.json()["session_id"].as_str().unwrap().to_string());
        } else {
            failures.push(format!(
                "cycle {cycle}: create after space returned: {} {}",
                a.status, a.text
            ));
        }

        // 4. SIGTERM ends within the grace, with exit 0.
        common::signal(node.pid(), libc::SIGTERM);
        let t = Instant::now();
        let status = loop {
            if let Ok(Some(st)) = node.child.try_wait() {
                break Some(st);
            }
            if t.elapsed() > Duration::from_millis(GRACE_MS + 2000) {
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        match status {
            Some(st) if st.success() => {
                println!(
                    "cycle {cycle}: SIGTERM: exit 0 in {} ms",
                    t.elapsed().as_millis()
                )
            }
            other => {
                failures.push(format!(
                    "cycle {cycle}: SIGTERM gave {other:?} after {} ms",
                    t.elapsed().as_millis()
                ));
                node.kill9();
            }
        }

        // 5. Restart on the same directory: every acknowledged create is
        // there. With the reserve on: each read counts (a write), and a
        // disk without a reserve could fill again on the way.
        let mut b = Node::builder().data_dir(&mnt).args([
            "--max-metadata-bytes",
            MAX_METADATA,
            "--max-body-bytes",
            MAX_BODY,
            "--min-free-mb",
            "1",
        ]);
        if redis_mode {
            b = b.args(["--redis-url", &redis_url, "--store-timeout-ms", "200"]);
        }
        let first_log = node.log_text();
        drop(node);
        let mut node = b.start();
        if let Err(e) = all_served(&node.client(), &acked, "after restart", false) {
            failures.push(format!("cycle {cycle}: {e}"));
        }
        assert!(node.terminate().success(), "{}", node.log_text());
        if !failures.is_empty() {
            println!(
                "cycle {cycle}: the node's warnings and errors:\n{}",
                complaints(&first_log[log_from.min(first_log.len())..])
            );
            break;
        }
        // The next cycle starts from an empty disk: a database grown over
        // many cycles would change what is measured (and fill the tmpfs).
        std::fs::remove_dir_all(mnt.join("db")).expect("remove the cycle's database");
        total_acked += acked.len();
        acked.clear();
        cycle += 1;
    }
    let count = |h: Hit| hits.iter().filter(|(.., x)| *x == h).count();
    println!(
        "{cycle} cycles in {} s, {} sessions acknowledged; ENOSPC cycles: {} on a log write, {} on a blob write, {} other; {:?}",
        started.elapsed().as_secs(),
        total_acked + acked.len(),
        count(Hit::Log),
        count(Hit::Blob),
        count(Hit::Other) + count(Hit::Reserve),
        hits
    );
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(
        count(Hit::Log) >= 3 && count(Hit::Blob) >= 3,
        "each sled write path must be hit three times: {hits:?}"
    );
}

/// The distinct warnings and errors of a node's log (the first 12, cut to
/// 300 characters), for the report of a failed cycle.
fn complaints(log: &str) -> String {
    let mut seen: Vec<String> = Vec::new();
    for line in log.lines() {
        if !(line.contains(" WARN ") || line.contains(" ERROR ")) {
            continue;
        }
        let line: String = line.get(28..).unwrap_or(line).chars().take(300).collect();
        if !seen.contains(&line) && seen.len() < 12 {
            seen.push(line);
        }
    }
    seen.join("\n")
}
