//! Bakes the target triple, the git commit and a fingerprint of the source
//! into the binary for `edgenode --version`.
use std::path::{Path, PathBuf};
use std::process::Command;

/// What the binary is built from: the manifest, the lock file, this script,
/// `src/` and the vendored sled. The tests compare the fingerprint of the
/// release binary they start with that of the build under test, so a stale
/// release binary is refused whatever its file time, and a current one is
/// accepted however long ago it was built.
const SOURCES: &[&str] = &["Cargo.toml", "Cargo.lock", "build.rs", "src", "vendor/sled"];

/// Every file below `path`, sorted, skipping build output and hidden files.
fn files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        let Ok(entries) = std::fs::read_dir(path) else {
            return;
        };
        let mut entries: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        for e in entries {
            let name = e.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with('.') || name == "target" {
                continue;
            }
            files(&e, out);
        }
    } else if path.is_file() {
        out.push(path.to_path_buf());
    }
}

/// FNV-1a over each file's path and contents: stable across compilers and
/// builds, unlike std's hasher; collisions do not matter here.
fn source_fingerprint() -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    let mut all = Vec::new();
    for s in SOURCES {
        files(Path::new(s), &mut all);
        println!("cargo:rerun-if-changed={s}");
    }
    for f in all {
        eat(f.to_string_lossy().as_bytes());
        eat(&[0]);
        eat(&std::fs::read(&f).unwrap_or_default());
        eat(&[0]);
    }
    format!("{h:016x}")
}

fn main() {
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".into());
    println!("cargo:rustc-env=EDGENODE_TARGET={target}");
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=EDGENODE_COMMIT={commit}");
    println!("cargo:rustc-env=EDGENODE_SOURCE={}", source_fingerprint());
    // The clock floor: a node never creates or slides sessions with a clock
    // earlier than this (a Pi without RTC before NTP). The commit's time, or
    // SOURCE_DATE_EPOCH; never the build machine's clock, so builds repeat.
    let floor = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .or_else(|| {
            Command::new("git")
                .args(["log", "-1", "--format=%ct"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| String::from_utf8(o.stdout).ok())
        })
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    println!("cargo:rustc-env=EDGENODE_CLOCK_FLOOR_SECS={floor}");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
}
