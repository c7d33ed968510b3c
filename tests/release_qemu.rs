//! The release binaries for the Pi, built with Debian's cross toolchains
//! (.cargo/config.toml) and run under qemu-user: an operator's first minutes
//! with the tarball — start, a session's whole life, stop, start again, the
//! session is still there, clean exit on SIGTERM.
//!
//! Needs gcc-aarch64-linux-gnu, libc6-dev-arm64-cross, gcc-arm-linux-gnueabihf,
//! libc6-dev-armhf-cross, qemu-user-static and the two rustup targets
//! (scripts/needs.sh); scripts/test.sh installs them.
//! Without them the test fails, never skips.

mod common;

use common::{free_port, id_of, signal, tempdir, Client};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const AARCH64: &str = "aarch64-unknown-linux-musl";
const ARMV7: &str = "armv7-unknown-linux-gnueabihf";
/// docs/performance.md: the primary release, stripped, stays under 4 MB.
const AARCH64_MAX_BYTES: u64 = 4_000_000;
/// qemu-user translates every instruction: be generous, but poll, never sleep.
const QEMU_TIMEOUT: Duration = Duration::from_secs(60);

/// The qemu-user command line that runs a `target` binary on this x86 host.
fn qemu(target: &str) -> Vec<&'static str> {
    match target {
        AARCH64 => vec!["qemu-aarch64-static"],
        ARMV7 => vec!["qemu-arm-static", "-L", "/usr/arm-linux-gnueabihf"],
        _ => unreachable!("{target}"),
    }
}

fn have_command(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
        .unwrap_or(false)
}

/// Fails (never skips) when a tool is missing, saying how to get it.
fn require_tools() {
    let mut missing: Vec<String> = [
        "aarch64-linux-gnu-gcc",
        "arm-linux-gnueabihf-gcc",
        "qemu-aarch64-static",
        "qemu-arm-static",
    ]
    .iter()
    .filter(|c| !have_command(c))
    .map(|c| c.to_string())
    .collect();
    // The libraries and headers the cross gcc only recommends, by a file each provides.
    for (file, package) in [
        (
            "/usr/arm-linux-gnueabihf/lib/libc.so",
            "libc6-dev-armhf-cross",
        ),
        (
            "/usr/aarch64-linux-gnu/include/bits/libc-header-start.h",
            "libc6-dev-arm64-cross",
        ),
    ] {
        if !Path::new(file).exists() {
            missing.push(format!("{file} ({package})"));
        }
    }
    let sysroot = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    for t in [AARCH64, ARMV7] {
        if !Path::new(&sysroot).join("lib/rustlib").join(t).exists() {
            missing.push(format!("rustup target {t}"));
        }
    }
    assert!(
        missing.is_empty(),
        "cross toolchain incomplete, missing: {}.\nRun scripts/test.sh, which installs \
         them (scripts/doctor.sh lists each missing file and its package).",
        missing.join(", ")
    );
}

/// Builds both release binaries once, in one cargo run, and returns their paths.
///
/// The outer `cargo test` keeps target/ locked, so the nested cargo builds in
/// target/cross (gitignored, like target/) and does not wait on that lock.
fn release_binaries() -> &'static [(String, PathBuf)] {
    static BUILT: OnceLock<Vec<(String, PathBuf)>> = OnceLock::new();
    BUILT.get_or_init(|| {
        require_tools();
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let target_dir = root.join("target/cross");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let started = Instant::now();
        let out = Command::new(cargo)
            .current_dir(root)
            .env("CARGO_TARGET_DIR", &target_dir)
            .args(["build", "--release", "--locked", "--target", AARCH64])
            .args(["--target", ARMV7])
            .stdin(Stdio::null())
            .output()
            .expect("run cargo");
        assert!(
            out.status.success(),
            "cross build failed (run scripts/test.sh to install the toolchains):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "cross release build: {:.0} s",
            started.elapsed().as_secs_f64()
        );
        [AARCH64, ARMV7]
            .iter()
            .map(|t| {
                let bin = target_dir.join(t).join("release/edgenode");
                let size = std::fs::metadata(&bin).expect("built binary").len();
                eprintln!("{t}: stripped binary {size} bytes");
                (t.to_string(), bin)
            })
            .collect()
    })
}

fn binary(target: &str) -> PathBuf {
    release_binaries()
        .iter()
        .find(|(t, _)| t == target)
        .map(|(_, p)| p.clone())
        .expect("built")
}

/// What `file` would say, read from the ELF headers: class, machine, whether
/// there is a program interpreter (dynamic linking), whether a symbol table
/// is left (not stripped).
#[derive(Debug)]
struct Elf {
    bits: u8,
    machine: u16,
    interpreter: Option<String>,
    has_symtab: bool,
}

fn read_elf(path: &Path) -> Elf {
    let b = std::fs::read(path).expect("read binary");
    assert_eq!(&b[..4], b"\x7fELF", "{} is not ELF", path.display());
    assert_eq!(b[5], 1, "little-endian");
    let bits = if b[4] == 2 { 64 } else { 32 };
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap()) as usize;
    let word = |o: usize| if bits == 64 { u64_at(o) } else { u32_at(o) };
    // Offsets of the ELF header fields and of p_offset/p_filesz, sh_type.
    let (phoff, shoff, phentsize, phnum, shentsize, shnum) = if bits == 64 {
        (
            u64_at(0x20),
            u64_at(0x28),
            u16_at(0x36),
            u16_at(0x38),
            u16_at(0x3a),
            u16_at(0x3c),
        )
    } else {
        (
            u32_at(0x1c),
            u32_at(0x20),
            u16_at(0x2a),
            u16_at(0x2c),
            u16_at(0x2e),
            u16_at(0x30),
        )
    };
    let (p_offset, p_filesz) = if bits == 64 {
        (0x08, 0x20)
    } else {
        (0x04, 0x10)
    };
    const PT_INTERP: usize = 3;
    const SHT_SYMTAB: usize = 2;
    let interpreter = (0..phnum)
        .map(|i| phoff + i * phentsize)
        .find(|&ph| u32_at(ph) == PT_INTERP)
        .map(|ph| {
            let (off, len) = (word(ph + p_offset), word(ph + p_filesz));
            String::from_utf8_lossy(&b[off..off + len])
                .trim_end_matches('\0')
                .to_string()
        });
    let has_symtab = (0..shnum).any(|i| u32_at(shoff + i * shentsize + 4) == SHT_SYMTAB);
    Elf {
        bits,
        machine: u16_at(0x12) as u16,
        interpreter,
        has_symtab,
    }
}

/// One edgenode process under qemu-user.
struct Emulated {
    child: Child,
    client: Client,
    log: PathBuf,
}

impl Emulated {
    fn start(target: &str, data_dir: &Path) -> Emulated {
        let q = qemu(target);
        let port = free_port();
        let log = data_dir.join(format!("node-{port}.log"));
        let child = Command::new(q[0])
            .args(&q[1..])
            .arg(binary(target))
            .args(["--config", "/dev/null", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(data_dir.join("db"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e} (run scripts/test.sh)", q[0]));
        let mut node = Emulated {
            child,
            client: Client::new(format!("http://127.0.0.1:{port}")),
            log,
        };
        node.wait_ready();
        node
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + QEMU_TIMEOUT;
        loop {
            let ready = self
                .client
                .try_request("GET", "/api/ready", &[], None)
                .map(|a| a.status == 200)
                .unwrap_or(false);
            if ready {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("exited before ready ({st}); log:\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "not ready within {QEMU_TIMEOUT:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM (qemu-user hands it to the guest's handler) and the exit status.
    fn terminate(mut self) -> ExitStatus {
        signal(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + QEMU_TIMEOUT;
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "no exit within {QEMU_TIMEOUT:?} of SIGTERM; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Emulated {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Create, read, patch, delete; SIGTERM exits 0; restart keeps the session.
fn smoke(target: &str) {
    let bin = binary(target);
    let q = qemu(target);
    let version = Command::new(q[0])
        .args(&q[1..])
        .arg(&bin)
        .arg("--version")
        .output()
        .expect("run --version under qemu");
    let version = String::from_utf8_lossy(&version.stdout);
    assert!(
        version.contains(env!("CARGO_PKG_VERSION")) && version.contains(target),
        "--version: {version}"
    );

    let dir = tempdir();
    let node = Emulated::start(target, dir.path());
    let c = node.client.clone();
    let s = c.create(r#"{"user_id":"pi","metadata":{"board":"zero2"}}"#);
    let id = id_of(&s);
    let path = format!("/api/sessions/{id}");

    let r = c.get(&path);
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["request_count"], 1);
    assert_eq!(r.json()["user_id"], "pi");

    let p = c.patch(&path, r#"{"metadata":{"x":1}}"#);
    assert_eq!(p.status, 200, "{}", p.text);
    assert_eq!(p.json()["metadata"], json!({"board": "zero2", "x": 1}));

    let other = format!("/api/sessions/{}", id_of(&c.create("{}")));
    assert_eq!(c.delete(&other).status, 204);
    assert_eq!(c.get(&other).status, 404);

    let st = node.terminate();
    assert_eq!(st.code(), Some(0), "first SIGTERM: {st}");

    let node = Emulated::start(target, dir.path());
    let r = node.client.get(&path);
    assert_eq!(r.status, 200, "after restart: {}", r.text);
    assert_eq!(r.json()["user_id"], "pi");
    assert_eq!(r.json()["metadata"], json!({"board": "zero2", "x": 1}));
    assert_eq!(node.client.get(&other).status, 404, "deleted stays deleted");
    let st = node.terminate();
    assert_eq!(st.code(), Some(0), "second SIGTERM: {st}");
}

#[test]
fn aarch64_musl_release_is_static_small_and_serves_under_qemu() {
    let bin = binary(AARCH64);
    let elf = read_elf(&bin);
    assert_eq!((elf.bits, elf.machine), (64, 183), "aarch64 ELF: {elf:?}");
    assert_eq!(
        elf.interpreter, None,
        "the aarch64 release must be statically linked (no PT_INTERP)"
    );
    assert!(!elf.has_symtab, "the release binary must be stripped");
    let size = std::fs::metadata(&bin).unwrap().len();
    println!("{AARCH64}: {size} bytes stripped");
    assert!(
        size < AARCH64_MAX_BYTES,
        "{AARCH64} is {size} bytes stripped; the documented budget is under {AARCH64_MAX_BYTES}"
    );
    smoke(AARCH64);
}

#[test]
fn armv7_gnueabihf_release_serves_under_qemu() {
    let bin = binary(ARMV7);
    let elf = read_elf(&bin);
    assert_eq!((elf.bits, elf.machine), (32, 40), "32-bit ARM ELF: {elf:?}");
    assert_eq!(
        elf.interpreter.as_deref(),
        Some("/lib/ld-linux-armhf.so.3"),
        "linked against the armhf glibc of Raspberry Pi OS"
    );
    assert!(!elf.has_symtab, "the release binary must be stripped");
    println!(
        "{ARMV7}: {} bytes stripped",
        std::fs::metadata(&bin).unwrap().len()
    );
    smoke(ARMV7);
}

/// `scripts/release.sh` packs the shell completions and the man page,
/// generated from the flags, into the tarball; the bash script parses.
#[test]
fn aarch64_release_tarball_carries_completions_and_the_man_page() {
    // Built once for every test here; release.sh finds it up to date.
    let _ = binary(AARCH64);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .arg(root.join("scripts/release.sh"))
        .arg(AARCH64)
        .current_dir(root)
        .env("CARGO_TARGET_DIR", root.join("target/cross"))
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/release.sh");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "release.sh failed:\n{log}");
    let tarball = std::fs::read_dir(root.join("dist"))
        .expect("dist/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().ends_with(&format!("{AARCH64}.tar.gz")))
        })
        .unwrap_or_else(|| panic!("no {AARCH64} tarball in dist/:\n{log}"));
    let dir = tempdir();
    let untar = Command::new("tar")
        .arg("-xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(dir.path())
        .status()
        .expect("tar");
    assert!(untar.success());
    let top = std::fs::read_dir(dir.path())
        .unwrap()
        .next()
        .expect("one top directory")
        .unwrap()
        .path();
    for file in [
        "completions/edgenode.bash",
        "completions/_edgenode",
        "completions/edgenode.fish",
        "man/edgenode.1",
    ] {
        let text = std::fs::read_to_string(top.join(file))
            .unwrap_or_else(|e| panic!("{file} not in the tarball: {e}"))
            // roff writes a hyphen as `\-`.
            .replace("\\-", "-");
        // Generated from the flags: the newest ones are in every file.
        assert!(text.contains("api-token-file"), "{file}");
        assert!(text.contains("access-log"), "{file}");
    }
    let man = std::fs::read_to_string(top.join("man/edgenode.1")).unwrap();
    assert!(
        man.starts_with(".ie") || man.contains(".TH edgenode"),
        "roff: {man:.200}"
    );
    let syntax = Command::new("bash")
        .arg("-n")
        .arg(top.join("completions/edgenode.bash"))
        .output()
        .expect("bash -n");
    assert!(
        syntax.status.success(),
        "bash -n: {}",
        String::from_utf8_lossy(&syntax.stderr)
    );
}
