//! A disk that stops answering (rather than failing) never wedges the node
//! (issue 21): a flush that does not return within `disk_flush_timeout_ms`
//! is a disk fault.
//!
//! The node's data directory is an ext4 file system on a loop device this
//! test mounts, and `fsfreeze -f` freezes it for real: every write to it
//! (sled's log `pwrite`) then blocks in the kernel until it is thawed, as
//! on an SD card that stopped answering. Root only; elsewhere (or without
//! `mount`/`fsfreeze`/`mkfs.ext4`) it prints `SKIPPED:` and returns.
//!
//! 1. Sessions are created while the disk answers.
//! 2. Frozen: a create is answered 503 within the flush deadline (500 ms
//!    here) and a little, the next ones at once; `/api/ready` is 503 and
//!    `/api/health` says `degraded` with the reason, and keeps answering
//!    promptly (no runtime worker is blocked on the disk).
//! 3. Thawed: the node is ready again, creates work, every acknowledged
//!    session is served.
//! 4. Frozen again, stuck again: SIGTERM ends the process within the
//!    shutdown grace: the listener is closed and the main thread has exited
//!    (the kernel reaps the thread still blocked in the frozen file system
//!    when it is thawed, not before: nothing in user space can end a
//!    thread in uninterruptible sleep); after the thaw the exit status is
//!    0 and a restart serves every acknowledged session.
//!
//! The file system is thawed and unmounted by a guard, first thing on
//! drop, so a failing test never leaves a frozen file system behind (that
//! would hang every other process writing to it).
//!
//! `EDGENODE_STUCK_FLUSH_ROUNDS` repeats steps 2-3 (default 2).

mod common;

use common::{Answer, Client, Node};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const FLUSH_TIMEOUT_MS: u64 = 500;
const GRACE_MS: u64 = 2000;
/// What a request may take while the disk is stuck: the flush deadline for
/// the first write, plus this box's load.
const FIRST_BOUND: Duration = Duration::from_millis(FLUSH_TIMEOUT_MS + 1000);
/// What a request may take once the node knows the disk is stuck.
const AT_ONCE: Duration = Duration::from_millis(300);

/// An ext4 file system on a loop device, mounted at `dir`. Dropping it
/// thaws it (in case) and unmounts it.
struct LoopFs {
    dir: PathBuf,
}

/// Freezes and thaws a mounted file system; dropping it thaws it. Made
/// after the node, so that it is dropped before it: a node killed while
/// its file system is frozen cannot be reaped (`Node`'s drop waits for it)
/// until the thaw.
struct Freezer {
    dir: PathBuf,
    frozen: bool,
}

fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {cmd} ({e})"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

impl LoopFs {
    fn mount(image: &Path, dir: &Path) -> Result<LoopFs, String> {
        let f = std::fs::File::create(image).map_err(|e| format!("image: {e}"))?;
        f.set_len(128 << 20).map_err(|e| format!("image: {e}"))?;
        drop(f);
        run("mkfs.ext4", &["-q", "-F", &image.to_string_lossy()])?;
        std::fs::create_dir_all(dir).map_err(|e| format!("mount point: {e}"))?;
        run(
            "mount",
            &[
                "-o",
                "loop",
                &image.to_string_lossy(),
                &dir.to_string_lossy(),
            ],
        )
        .map_err(|e| format!("{e}; this test needs root and loop devices"))?;
        Ok(LoopFs {
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze")
            .arg("-u")
            .arg(&self.dir)
            .stderr(std::process::Stdio::null())
            .status();
        // `-o loop` set the loop device to detach itself on unmount.
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

impl Freezer {
    fn freeze(&mut self) {
        // Marked first: a freeze that half-happened is thawed all the same.
        self.frozen = true;
        run("fsfreeze", &["-f", &self.dir.to_string_lossy()]).expect("fsfreeze -f");
    }

    fn thaw(&mut self) {
        if self.frozen {
            run("fsfreeze", &["-u", &self.dir.to_string_lossy()]).expect("fsfreeze -u");
            self.frozen = false;
        }
    }
}

impl Drop for Freezer {
    fn drop(&mut self) {
        if self.frozen {
            let _ = Command::new("fsfreeze").arg("-u").arg(&self.dir).status();
        }
    }
}

/// A request, timed; a transport error is a failure of the test.
fn timed(client: &Client, method: &str, path: &str, body: Option<&str>) -> (Answer, Duration) {
    let t = Instant::now();
    let a = client
        .try_request(method, path, &[], body)
        .unwrap_or_else(|e| panic!("{method} {path} failed outright: {e}"));
    (a, t.elapsed())
}

fn create(client: &Client, n: u64) -> (Answer, Duration) {
    let body = format!(r#"{{"user_id":"u{n}","metadata":{{"n":{n}}}}}"#);
    timed(client, "POST", "/api/sessions", Some(&body))
}

/// Freezes the file system and makes the node notice: a create that waits
/// out the flush deadline (503), then creates answered 503 at once, an
/// unready node that says why, and a health endpoint that keeps answering.
fn freeze_and_check(fs: &mut Freezer, client: &Client, round: usize, n: &mut u64) {
    fs.freeze();
    let (a, took) = create(client, *n);
    *n += 1;
    println!(
        "round {round}: first create on the frozen disk: {} in {} ms",
        a.status,
        took.as_millis()
    );
    assert_eq!(a.status, 503, "first create while frozen: {}", a.text);
    assert_eq!(a.code(), "disk_fault", "{}", a.text);
    assert!(
        took <= FIRST_BOUND,
        "the first create took {} ms",
        took.as_millis()
    );
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let (a, took) = create(client, *n);
        *n += 1;
        assert_eq!(a.status, 503, "create while stuck: {}", a.text);
        slowest = slowest.max(took);
    }
    println!(
        "round {round}: 10 more creates: 503, slowest {} ms",
        slowest.as_millis()
    );
    assert!(
        slowest <= AT_ONCE,
        "a create took {} ms once the flush was known stuck",
        slowest.as_millis()
    );
    let (ready, _) = timed(client, "GET", "/api/ready", None);
    assert_eq!(ready.status, 503, "ready while stuck: {}", ready.text);
    let mut slowest = Duration::ZERO;
    let mut reason = String::new();
    for _ in 0..20 {
        let (h, took) = timed(client, "GET", "/api/health", None);
        slowest = slowest.max(took);
        let v = h.json();
        assert_eq!(v["status"], "degraded", "health while stuck: {}", h.text);
        reason = v["degraded_reason"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        std::thread::sleep(Duration::from_millis(25));
    }
    println!(
        "round {round}: health degraded ({reason}), 20 answers, slowest {} ms",
        slowest.as_millis()
    );
    assert!(reason.contains("flush"), "degraded reason: {reason}");
    assert!(
        slowest <= AT_ONCE,
        "health took {} ms while the disk was stuck",
        slowest.as_millis()
    );
}

/// `/proc/<pid>/stat`'s state letter of the thread group leader (the main
/// thread), `None` once the process is gone.
fn leader_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

fn all_served(client: &Client, ids: &[String], when: &str) {
    for id in ids {
        let a = client.get(&format!("/api/sessions/{id}"));
        assert_eq!(a.status, 200, "{when}: session {id}: {}", a.text);
    }
}

#[test]
fn a_stuck_disk_is_a_fault_and_never_holds_the_node() {
    let rounds: usize = std::env::var("EDGENODE_STUCK_FLUSH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let top = common::tempdir();
    let mnt = top.path().join("mnt");
    let _mounted = match LoopFs::mount(&top.path().join("image"), &mnt) {
        Ok(fs) => fs,
        Err(why) => {
            common::skip(&why);
            return;
        }
    };
    let node_builder = || {
        Node::builder()
            .data_dir(&mnt)
            .args(["--disk-flush-timeout-ms", &FLUSH_TIMEOUT_MS.to_string()])
            .args(["--shutdown-grace-ms", &GRACE_MS.to_string()])
            .args(["--drain-delay-ms", "0"])
            .args(["--create-rate-per-ip", "0"])
    };
    let mut node = node_builder().start();
    let mut fs = Freezer {
        dir: mnt.clone(),
        frozen: false,
    };
    let client = node.client().with_timeout(Duration::from_secs(30));
    let mut acked = Vec::new();
    let mut n = 0;
    let create_acked = |client: &Client, n: &mut u64, acked: &mut Vec<String>| {
        let (a, _) = create(client, *n);
        *n += 1;
        assert_eq!(a.status, 201, "create: {}", a.text);
        acked.push(common::id_of(&a.json()));
    };
    for _ in 0..20 {
        create_acked(&client, &mut n, &mut acked);
    }

    for round in 0..rounds {
        freeze_and_check(&mut fs, &client, round, &mut n);
        fs.thaw();
        let thawed = Instant::now();
        let ready = common::wait_until(Duration::from_secs(10), || {
            client
                .try_request("GET", "/api/ready", &[], None)
                .is_ok_and(|a| a.status == 200)
        });
        println!(
            "round {round}: ready {} ms after the thaw",
            thawed.elapsed().as_millis()
        );
        assert!(
            ready,
            "not ready after the thaw: {}\n{}",
            client.get("/api/health").text,
            node.log_text()
        );
        for _ in 0..5 {
            create_acked(&client, &mut n, &mut acked);
        }
        all_served(&client, &acked, "after the thaw");
    }

    // SIGTERM while the flush is stuck.
    freeze_and_check(&mut fs, &client, rounds, &mut n);
    let pid = node.pid();
    common::signal(pid, libc::SIGTERM);
    let t = Instant::now();
    let bound = Duration::from_millis(GRACE_MS + 1000);
    let mut exited = false;
    while t.elapsed() < bound {
        if let Ok(Some(_)) = node.child.try_wait() {
            exited = true;
            break;
        }
        // The main thread gone (a zombie leader: only the thread blocked
        // in the frozen file system is left), and nobody listening.
        let listening = std::net::TcpStream::connect(&node.addr).is_ok();
        if leader_state(pid) == Some('Z') && !listening {
            exited = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let stop_ms = t.elapsed().as_millis();
    let threads_left = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0);
    println!(
        "SIGTERM while stuck: main thread exited in {stop_ms} ms, {} thread(s) still blocked in the frozen file system",
        threads_left.saturating_sub(1)
    );
    fs.thaw();
    assert!(
        exited,
        "SIGTERM did not end the node within {} ms: {}",
        bound.as_millis(),
        node.log_text()
    );
    let t = Instant::now();
    let status = loop {
        if let Ok(Some(st)) = node.child.try_wait() {
            break Some(st);
        }
        if t.elapsed() > Duration::from_secs(10) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    println!(
        "after the thaw: reaped in {} ms, {status:?}",
        t.elapsed().as_millis()
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "exit status {status:?}: {}",
        node.log_text()
    );

    drop(node);
    let mut node = node_builder().start();
    all_served(&node.client(), &acked, "after the restart");
    println!(
        "{} acknowledged sessions served after the restart",
        acked.len()
    );
    assert!(node.terminate().success(), "{}", node.log_text());
}
