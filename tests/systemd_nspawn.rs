//! The shipped units under a real systemd: a Debian bookworm container booted
//! with `systemd-nspawn -b` (systemd as PID 1), edgenode installed into it by
//! `deploy/install.sh --root`, and a oneshot probe unit inside
//! (`scripts/nspawn-probe.sh`) that drives systemctl and edgenode, records what
//! it saw in `/probe/results` and powers the container off. The assertions are
//! made here, on the host, from that file.
//!
//! The root file system is built once by `scripts/nspawn-rootfs.sh` (debootstrap,
//! about a minute) and cached under `target/nspawn/` (or `$EDGENODE_NSPAWN_CACHE`);
//! each test boots a throw-away copy of it. The container has its own network
//! namespace (`--private-network`): every request stays on its loopback, so the
//! shipped addresses (127.0.0.1:8080) are used as they are.
//!
//! Skipped, with the reason printed, only where debootstrap or nspawn cannot
//! run: not root, the tools missing, no network to the Debian mirror, nspawn
//! refused to start a container. Set `EDGENODE_NSPAWN_KEEP=1` to keep the
//! booted copies (their path is printed) for a look afterwards.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const REPO: &str = env!("CARGO_MANIFEST_DIR");
/// Host side bound on one boot; the probe itself takes about 15 s.
const BOOT_TIMEOUT_SECS: u64 = 150;

fn target_dir() -> PathBuf {
    Path::new(BIN)
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

fn cache_dir() -> PathBuf {
    std::env::var_os("EDGENODE_NSPAWN_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("nspawn"))
}

/// The cached root file system, built when missing; `Err` is the reason to
/// skip. Asked once per test binary: the second test does not try a mirror
/// the first found unreachable.
fn cached_rootfs() -> Result<PathBuf, String> {
    static ROOTFS: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    ROOTFS.get_or_init(build_rootfs).clone()
}

fn build_rootfs() -> Result<PathBuf, String> {
    let arch = Command::new("dpkg")
        .arg("--print-architecture")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .ok_or("no dpkg: not a Debian-family host")?;
    let rootfs = cache_dir().join(format!("bookworm-{arch}"));
    let started = Instant::now();
    // The script's progress (a build takes a minute) goes straight to the
    // terminal; its stdout carries the SKIP reason.
    let out = Command::new("bash")
        .arg(Path::new(REPO).join("scripts/nspawn-rootfs.sh"))
        .arg(&rootfs)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run scripts/nspawn-rootfs.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    match out.status.code() {
        Some(0) => {
            println!(
                "rootfs ready in {:.1}s: {}",
                started.elapsed().as_secs_f64(),
                rootfs.display()
            );
            Ok(rootfs)
        }
        Some(77) => Err(stdout
            .lines()
            .find_map(|l| l.strip_prefix("SKIP: "))
            .unwrap_or("nspawn-rootfs.sh could not run")
            .to_string()),
        _ => panic!(
            "scripts/nspawn-rootfs.sh {} failed ({}):\n{stdout}",
            rootfs.display(),
            out.status
        ),
    }
}

/// A line that shows in `cargo test` output even when the test passes
/// (libtest captures print!, not writes to the stderr handle).
fn tell(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// `install.sh`: edgenode.service alone, edgenode binds `listen`.
    Service,
    /// `install.sh --socket`: edgenode.socket owns the port.
    Socket,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Service => "service",
            Mode::Socket => "socket",
        }
    }
}

/// What one boot left behind.
struct Boot {
    results: BTreeMap<String, String>,
    probe_dir: PathBuf,
    /// Boot log, probe log and the container's journal, for failure messages.
    context: String,
    _work: Option<tempfile::TempDir>,
}

impl Boot {
    fn get(&self, key: &str) -> &str {
        self.results
            .get(key)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("probe recorded no {key}\n{}", self.context))
    }
    fn num(&self, key: &str) -> u64 {
        self.get(key)
            .parse()
            .unwrap_or_else(|_| panic!("{key}={} is not a number", self.get(key)))
    }
    /// Asserts `key` has `want`, showing the whole record otherwise.
    fn expect(&self, key: &str, want: &str) {
        assert_eq!(self.get(key), want, "{key}\n{}", self.dump());
    }
    fn check(&self, ok: bool, what: &str) {
        assert!(ok, "{what}\n{}", self.dump());
    }
    fn dump(&self) -> String {
        let mut s = String::from("--- /probe/results\n");
        for (k, v) in &self.results {
            s += &format!("{k}={v}\n");
        }
        s + &self.context
    }
    fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.probe_dir.join(name)).unwrap_or_default()
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// Copies the cached root, installs edgenode into the copy with
/// `deploy/install.sh --root` (plus `--socket`), adds the probe, boots it and
/// reads what the probe recorded. `None`: skipped (reason printed).
fn boot(mode: Mode) -> Option<Boot> {
    // Inside a container already (systemd-nspawn sets `container` for what it
    // runs), a second nspawn boots, but its private loopback cannot be
    // reached (seen: every request "connection refused" while the unit was
    // active): what it would prove is not what it would measure.
    if let Some(outer) = std::env::var_os("container").filter(|v| !v.is_empty()) {
        tell(&format!(
            "SKIPPED: units under systemd-nspawn ({}): this test already runs inside a container ({}); nested nspawn is not tested",
            mode.name(),
            outer.to_string_lossy()
        ));
        return None;
    }
    let rootfs = match cached_rootfs() {
        Ok(r) => r,
        Err(reason) => {
            tell(&format!(
                "SKIPPED: units under systemd-nspawn ({}): {reason}",
                mode.name()
            ));
            return None;
        }
    };
    let work = tempfile::Builder::new()
        .prefix(&format!("run-{}-", mode.name()))
        .tempdir_in(cache_dir())
        .expect("work dir");
    let root = work.path().join("root");
    run(Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(&rootfs)
        .arg(&root));

    // A release directory as the tarball lays it out, with the host build.
    let release = work.path().join("release");
    std::fs::create_dir_all(release.join("systemd")).unwrap();
    std::fs::copy(release_binary(), release.join("edgenode")).unwrap();
    for unit in ["edgenode.service", "edgenode.socket"] {
        std::fs::copy(
            Path::new(REPO).join("systemd").join(unit),
            release.join("systemd").join(unit),
        )
        .unwrap();
    }
    std::fs::copy(
        Path::new(REPO).join("deploy/edgenode.toml.example"),
        release.join("edgenode.toml.example"),
    )
    .unwrap();

    let mut install = Command::new("sh");
    install
        .arg(Path::new(REPO).join("deploy/install.sh"))
        .arg("--src")
        .arg(&release)
        .arg("--root")
        .arg(&root);
    if mode == Mode::Socket {
        install.arg("--socket");
    }
    let installed = run(&mut install);
    // What install.sh would run on a real machine, printed as
    // "install.sh: skipped (--root DIR): systemctl ...": the probe runs it.
    let commands: Vec<&str> = installed
        .lines()
        .filter(|l| l.contains("skipped ("))
        .filter_map(|l| l.find("): systemctl ").map(|i| &l[i + 3..]))
        .collect();
    assert!(
        commands.iter().any(|c| c.starts_with("systemctl enable")),
        "install.sh --root printed no systemctl enable to replay:\n{installed}"
    );

    let probe = root.join("probe");
    std::fs::create_dir_all(&probe).unwrap();
    std::fs::write(probe.join("install-commands"), commands.join("\n") + "\n").unwrap();
    std::fs::copy(
        Path::new(REPO).join("scripts/nspawn-probe.sh"),
        probe.join("probe.sh"),
    )
    .unwrap();
    if mode == Mode::Socket {
        // Proves the socket is used: edgenode's own address is ignored.
        let conf = root.join("etc/edgenode/edgenode.toml");
        let mut text = std::fs::read_to_string(&conf).expect("install.sh wrote edgenode.toml");
        text += "\nlisten = \"127.0.0.1:8079\"\n";
        std::fs::write(&conf, text).unwrap();
    }
    let unit_dir = root.join("etc/systemd/system");
    std::fs::write(
        unit_dir.join("edgenode-probe.service"),
        format!(
            "[Unit]\n\
             Description=edgenode test probe\n\
             After=multi-user.target\n\
             # However the probe ends, the container powers off.\n\
             SuccessAction=poweroff\n\
             FailureAction=poweroff\n\
             [Service]\n\
             Type=oneshot\n\
             ExecStart=/bin/bash /probe/probe.sh {}\n\
             TimeoutStartSec=120s\n\
             StandardOutput=append:/probe/probe.log\n\
             StandardError=append:/probe/probe.log\n\
             [Install]\n\
             WantedBy=multi-user.target\n",
            mode.name()
        ),
    )
    .unwrap();
    std::fs::create_dir_all(unit_dir.join("multi-user.target.wants")).unwrap();
    std::os::unix::fs::symlink(
        "/etc/systemd/system/edgenode-probe.service",
        unit_dir.join("multi-user.target.wants/edgenode-probe.service"),
    )
    .unwrap();

    let boot_log = work.path().join("boot.log");
    let started = Instant::now();
    let status = Command::new("timeout")
        .args(["-k", "10", &BOOT_TIMEOUT_SECS.to_string()])
        .arg("systemd-nspawn")
        .args(["--register=no", "--keep-unit", "--quiet", "-b"])
        .args(["--console=pipe", "--private-network"])
        .args(["--machine", &format!("edgenode-{}", mode.name())])
        .arg("-D")
        .arg(&root)
        .arg("systemd.show_status=1")
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&boot_log).unwrap())
        .stderr(std::fs::File::create(work.path().join("boot.err")).unwrap())
        .status()
        .expect("run systemd-nspawn");
    let took = started.elapsed();
    println!(
        "booted {} container, probed and powered off in {:.1}s ({status})",
        mode.name(),
        took.as_secs_f64()
    );

    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let journal = Command::new("journalctl")
        .arg("-D")
        .arg(root.join("var/log/journal"))
        .args(["--no-pager", "-o", "short-monotonic", "-n", "150"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    let context = format!(
        "--- nspawn ({status}, {took:?})\n{}{}--- /probe/probe.log\n{}--- container journal (last 150)\n{journal}",
        read(&boot_log),
        read(&work.path().join("boot.err")),
        read(&probe.join("probe.log")),
    );
    let results: BTreeMap<String, String> = read(&probe.join("results"))
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert!(
        results.get("done").map(String::as_str) == Some("1"),
        "the probe did not finish in the {} container:\n{}",
        mode.name(),
        context
    );
    let keep = std::env::var_os("EDGENODE_NSPAWN_KEEP").is_some();
    let work = if keep {
        println!("kept: {}", work.path().display());
        let _ = work.keep();
        None
    } else {
        Some(work)
    };
    Some(Boot {
        results,
        probe_dir: probe,
        context,
        _work: work,
    })
}

/// The probe replayed install.sh's systemctl commands without error.
fn check_install(b: &Boot, enable: &str) {
    let n = b.num("install.count");
    b.check(n >= 2, "install.sh printed daemon-reload and enable");
    let mut saw_enable = false;
    for i in 1..=n {
        let line = b.get(&format!("install.{i}"));
        b.check(line.starts_with("rc=0 "), &format!("install.{i}: {line}"));
        saw_enable |= line.ends_with(enable);
    }
    b.check(saw_enable, &format!("install.sh ran `{enable}`"));
}

#[test]
fn the_service_unit_under_systemd_notify_watchdog_dynamic_user_restart_and_stop() {
    let Some(b) = boot(Mode::Service) else {
        return;
    };
    b.check(
        b.get("binary").starts_with("edgenode "),
        "the host build runs in bookworm",
    );
    check_install(&b, "systemctl enable --now edgenode.service");

    // Type=notify reached active: `enable --now` returned after READY=1, and
    // the status line edgenode sent with it is what systemd shows.
    b.expect("start.Type", "notify");
    b.expect("start.NotifyAccess", "main");
    b.expect("start.ActiveState", "active");
    b.expect("start.SubState", "running");
    b.check(
        b.get("start.StatusText")
            .starts_with("serving on 127.0.0.1:8080")
            || b.get("start.StatusText").starts_with("store sled"),
        "STATUS= from edgenode reached systemd",
    );

    // The watchdog is armed with the unit's 30 s ...
    b.expect("start.WatchdogUSec", "30s");
    // ... and pinged: with WatchdogSec=2s the node lives on, same pid, no
    // restart, and systemd saw pings after the first one.
    b.expect("wd0.WatchdogUSec", "2s");
    b.expect("wd1.ActiveState", "active");
    b.expect("wd1.MainPID", b.get("wd0.MainPID"));
    b.expect("wd1.NRestarts", "0");
    b.check(
        b.num("wd1.WatchdogTimestampMonotonic")
            >= b.num("wd0.WatchdogTimestampMonotonic") + 2_000_000,
        "watchdog pings kept arriving (WatchdogTimestamp advanced by 2 s or more in 5 s)",
    );

    // Ordered after time-sync.target, which was reached before edgenode started.
    b.check(
        b.get("start.After")
            .split(' ')
            .any(|u| u == "time-sync.target"),
        "After= includes time-sync.target",
    );
    b.check(
        b.get("start.Wants")
            .split(' ')
            .any(|u| u == "time-sync.target"),
        "Wants= includes time-sync.target",
    );
    b.expect("timesync.ActiveState", "active");
    b.check(
        b.num("timesync.ActiveEnterTimestampMonotonic")
            <= b.num("start.ExecMainStartTimestampMonotonic"),
        "time-sync.target was reached before edgenode started",
    );

    // DynamicUser: a transient uid from systemd's dynamic range, not root.
    b.expect("start.DynamicUser", "yes");
    let uid = b.num("main.uid");
    b.check(
        (61184..=65519).contains(&uid),
        &format!("uid {uid} is in the dynamic range 61184-65519"),
    );
    b.expect("main.gid", &uid.to_string());
    b.expect("main.nonewprivs", "1");
    b.expect("main.capeff", "0000000000000000");
    // The sandbox is real here, not skipped for want of privilege.
    b.expect("main.own_mount_ns", "yes");
    b.expect("main.own_user_ns", "yes");
    b.expect("main.uid_map", &format!("0 0 1;{uid} {uid} 1;"));
    // /etc/edgenode too, though ConfigurationDirectory= alone would mount it
    // read-write (the unit's ReadOnlyPaths= is what this checks).
    b.expect("main.can_write_etc", "no");
    b.expect("main.can_write_state", "yes");
    // StateDirectory: /var/lib/edgenode -> private/edgenode, 0700, the
    // dynamic user's, handed to edgenode as $STATE_DIRECTORY and used by sled.
    b.expect("start.StateDirectory", "edgenode");
    b.expect("main.state_directory_env", "/var/lib/edgenode");
    b.expect("state.link", "private/edgenode");
    b.expect("state.dir", &format!("{uid} 700 directory"));
    b.check(
        b.num("state.files") > 0,
        "sled's files are in the state directory",
    );
    b.expect("state.foreign", "0");

    // A session survives systemctl restart (a new process, a new invocation).
    b.expect("create.status", "201");
    b.expect("restart.rc", "0");
    b.expect("restarted.ActiveState", "active");
    b.check(
        b.get("restarted.MainPID") != b.get("start.MainPID")
            && b.get("restarted.InvocationID") != b.get("start.InvocationID"),
        "restart started a new process",
    );
    b.expect("get_after_restart.status", "200");
    b.check(
        b.get("get_after_restart.body").contains("across restart")
            && b.get("get_after_restart.body").contains(b.get("create.id")),
        "the session read back after the restart is the one created before",
    );

    // systemctl stop: STOPPING=1 and "draining" reach systemd, the requests in
    // flight when it began are answered, and the unit ends with Result=success.
    b.expect("stop.in_flight_before", "3");
    b.expect("stopping.ActiveState", "deactivating");
    b.expect("stopping.StatusText", "draining");
    b.expect("stop.still_deactivating", "deactivating");
    for i in 1..=3 {
        let line = b.get(&format!("stop.inflight.{i}"));
        b.check(
            line.starts_with("HTTP/1.1 201"),
            &format!("in-flight request {i} was answered during the stop: {line:?}"),
        );
    }
    b.expect("stop.rc", "0");
    b.expect("stopped.ActiveState", "inactive");
    b.expect("stopped.Result", "success");
    b.expect("stopped.ExecMainCode", "1"); // CLD_EXITED
    b.expect("stopped.ExecMainStatus", "0");
    b.expect("stop.old_pid_gone", "yes");
    b.check(
        b.num("stop.flushed") >= 1,
        "the journal shows sled flushed on stop",
    );

    // api_token_file as docs/operations.md ("Rotating the API token") sets it
    // up, done literally in the container: the group, the file
    // root:edgenode-secrets 0640, `systemctl edit` with the two lines the
    // docs give, one restart. The dynamic user reads the file through the
    // supplementary group (and nobody else can), and two reloads rotate the
    // token without a restart.
    b.expect("tokens.groupadd_rc", "0");
    b.expect("tokens.install_rc", "0");
    b.expect("tokens.edit_rc", "0");
    b.expect(
        "tokens.dropin",
        "[Service];SupplementaryGroups=edgenode-secrets",
    );
    b.expect("tokens.restart_rc", "0");
    b.expect("tokens.ActiveState", "active");
    b.expect("tokens.SupplementaryGroups", "edgenode-secrets");
    b.check(
        b.get("tokens.DropInPaths")
            .contains("/etc/systemd/system/edgenode.service.d/override.conf"),
        "systemctl edit wrote the drop-in where systemd reads it",
    );
    b.expect("tokens.file", "root:edgenode-secrets 640");
    b.check(
        b.get("tokens.main_groups")
            .split_whitespace()
            .any(|g| g == b.get("tokens.secrets_gid")),
        "the service's process is in edgenode-secrets",
    );
    b.expect("tokens.nobody_reads", "no");
    // Started with the old token alone in the file.
    b.expect("tokens.start.old.create", "201");
    b.expect("tokens.start.old.read", "200");
    b.expect("tokens.start.new.create", "401");
    b.expect("tokens.start.wrong", "401");
    b.expect("tokens.start.none", "401");
    // Old and new in the file, reloaded: both work.
    b.expect("tokens.both.reload_rc", "0");
    b.check(
        b.get("tokens.both.reloaded").contains("from_file=2"),
        "the reload read both tokens",
    );
    for t in ["old", "new"] {
        b.expect(&format!("tokens.both.{t}.create"), "201");
        b.expect(&format!("tokens.both.{t}.read"), "200");
    }
    b.expect("tokens.both.wrong", "401");
    b.expect("tokens.both.none", "401");
    // The old one removed, reloaded: refused; the new one still works.
    b.expect("tokens.new.reload_rc", "0");
    b.check(
        b.get("tokens.new.reloaded").contains("from_file=1"),
        "the reload read one token",
    );
    b.expect("tokens.new.old.create", "401");
    b.expect("tokens.new.new.create", "201");
    b.expect("tokens.new.new.read", "200");
    b.expect("tokens.new.wrong", "401");
    b.expect("tokens.new.none", "401");
    // Rewriting the file in place kept its owner, group and mode; the
    // reloads restarted nothing.
    b.expect("tokens.new.file", "root:edgenode-secrets 640");
    b.expect("tokens.end.ActiveState", "active");
    b.expect("tokens.end.MainPID", b.get("tokens.MainPID"));
    b.expect("tokens.end.NRestarts", "0");
    b.check(
        b.file("failed-units.txt").trim().is_empty(),
        &format!("no failed units:\n{}", b.file("failed-units.txt")),
    );
}

/// One request of the load: `start end curl-exit http-status`.
struct Request {
    start: f64,
    end: f64,
    curl_rc: u32,
    status: String,
}

#[test]
fn socket_activation_under_systemd_restarts_under_load_without_refusing_a_connection() {
    let Some(b) = boot(Mode::Socket) else {
        return;
    };
    check_install(
        &b,
        "systemctl enable --now edgenode.socket edgenode.service",
    );

    b.expect("sock.ActiveState", "active");
    b.check(
        b.get("sock.Listen").contains("127.0.0.1:8080 (Stream)"),
        "edgenode.socket listens on its shipped address",
    );
    b.expect("start.ActiveState", "active");
    b.check(
        b.get("start.TriggeredBy").contains("edgenode.socket"),
        "edgenode.service is triggered by edgenode.socket",
    );
    b.check(
        b.get("start.After")
            .split(' ')
            .any(|u| u == "time-sync.target"),
        "After= includes time-sync.target",
    );
    b.expect("create.status", "201");
    // edgenode's own listen address (8079 in its config) is not bound.
    b.expect("own_listen.curl_rc", "7");

    // Three restarts, each a new process.
    let pids: Vec<&str> = b.get("restart.pids").split_whitespace().collect();
    let mut distinct = pids.clone();
    distinct.sort();
    distinct.dedup();
    b.check(
        pids.len() == 4 && distinct.len() == 4,
        &format!("each restart started a new process: {pids:?}"),
    );
    let mut windows = Vec::new();
    for r in 1..=3 {
        b.expect(&format!("restart.{r}.rc"), "0");
        let at = |k: &str| -> f64 { b.get(&format!("restart.{r}.{k}")).parse().unwrap() };
        windows.push((at("begin"), at("end")));
    }

    // The load: every request got 200, none was refused, and requests were
    // waiting on the socket during every restart.
    let mut requests = Vec::new();
    for w in 1..=4 {
        for line in b.file(&format!("load.{w}")).lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 3 {
                continue; // cut off by the stop of the load
            }
            requests.push(Request {
                start: f[0].parse().unwrap(),
                end: f[1].parse().unwrap(),
                curl_rc: f[2].parse().unwrap(),
                status: f.get(3).unwrap_or(&"").to_string(),
            });
        }
    }
    let refused = requests.iter().filter(|r| r.curl_rc == 7).count();
    // curl 52 (empty reply) / 56 (reset): accepted, then closed unanswered.
    let unanswered = requests
        .iter()
        .filter(|r| r.curl_rc == 52 || r.curl_rc == 56)
        .count();
    let mut failed: BTreeMap<String, usize> = BTreeMap::new();
    for r in requests
        .iter()
        .filter(|r| r.curl_rc != 0 || r.status != "200")
    {
        *failed
            .entry(format!("curl exit {} status {}", r.curl_rc, r.status))
            .or_default() += 1;
    }
    let during: Vec<usize> = windows
        .iter()
        .map(|&(begin, end)| {
            requests
                .iter()
                .filter(|r| r.start < end && r.end > begin)
                .count()
        })
        .collect();
    let longest = requests.iter().map(|r| r.end - r.start).fold(0.0, f64::max);
    println!(
        "load: {} requests, {refused} refused, {unanswered} closed unanswered, failures {failed:?}; \
         requests in progress during the restarts {during:?}; restarts took {:?} s; slowest request {longest:.3} s",
        requests.len(),
        windows
            .iter()
            .map(|(a, b)| format!("{:.3}", b - a))
            .collect::<Vec<_>>()
    );
    b.check(
        requests.len() >= 50,
        &format!("a load ran ({} requests)", requests.len()),
    );
    let errs: String = (1..=4).map(|w| b.file(&format!("load.{w}.err"))).collect();
    // What the unit promises: systemd holds the socket, so no connection is
    // ever refused while edgenode restarts.
    b.check(
        refused == 0,
        &format!("{refused} connections refused during restarts:\n{errs}"),
    );
    // A connection the old process accepted in the instant before its
    // shutdown, before hyper read its request, used to be closed unanswered
    // (hyper's graceful shutdown closes a connection that has not started a
    // request): 0 to 3 times in 1 000 requests here. The server now gives
    // just-accepted connections a moment to start theirs (server.rs,
    // FIRST_REQUEST_GRACE); none may be lost.
    const TOLERATED_UNANSWERED_PER_RESTART: usize = 0;
    if unanswered > 0 {
        // When, relative to the restart it fell in (begin of the restart = 0).
        let when: Vec<String> = requests
            .iter()
            .filter(|r| r.curl_rc == 52 || r.curl_rc == 56)
            .map(|r| {
                let (begin, end) = windows
                    .iter()
                    .copied()
                    .min_by(|a, b| (a.0 - r.start).abs().total_cmp(&(b.0 - r.start).abs()))
                    .unwrap();
                format!(
                    "curl exit {} over [{:+.3}, {:+.3}] s of a restart lasting {:.3} s",
                    r.curl_rc,
                    r.start - begin,
                    r.end - begin,
                    end - begin
                )
            })
            .collect();
        tell(&format!(
            "KNOWN ISSUE: {unanswered} connection(s) accepted by a stopping edgenode were closed \
             unanswered (hyper graceful shutdown before the first request was read): {when:?}"
        ));
    }
    b.check(
        unanswered <= TOLERATED_UNANSWERED_PER_RESTART * windows.len(),
        &format!("{unanswered} connections closed unanswered during restarts:\n{errs}"),
    );
    b.check(
        failed.values().sum::<usize>() == unanswered,
        &format!("every request that was answered got 200: {failed:?}\n{errs}"),
    );
    b.check(
        during.iter().all(|&n| n >= 1),
        &format!("requests were in progress during every restart: {during:?}"),
    );
    b.expect("restarted.ActiveState", "active");
    b.expect("restarted_sock.ActiveState", "active");

    // Stopping the service alone: drained, Result=success, the socket keeps
    // listening and the next connection starts edgenode again.
    b.expect("stop.rc", "0");
    b.expect("stopped.ActiveState", "inactive");
    b.expect("stopped.Result", "success");
    b.expect("stopped.ExecMainStatus", "0");
    b.expect("stopped_sock.ActiveState", "active");
    b.expect("reactivated.status", "200");
    b.expect("reactivated.ActiveState", "active");
    // Both stopped: the node is out, the port closed.
    b.expect("out.ActiveState", "inactive");
    b.expect("out.Result", "success");
    b.expect("out_sock.ActiveState", "inactive");
    b.expect("out.curl_rc", "7");
    b.check(
        b.file("failed-units.txt").trim().is_empty(),
        &format!("no failed units:\n{}", b.file("failed-units.txt")),
    );
}
