//! The container files: `edgenode healthcheck`, `Containerfile` and
//! `compose.yaml`, checked as far as this machine allows without running a
//! container (on the development machines crun cannot set rlimits, so
//! `podman run` fails; `podman build` works).
//!
//! - `healthcheck` against real nodes on 127.0.0.1: 0 when ready, 1 when
//!   draining or when nothing listens; the address found through flags,
//!   environment, file and a wildcard `listen`.
//! - `compose.yaml` parsed (python3's yaml module when present, and always
//!   this file's reader for the block-YAML subset the file is written in,
//!   compared with each other), then read for what the topology needs: Redis
//!   with appendonly on its own volume, three nodes with their own volumes,
//!   one Redis URL, the token from an env file, `cookie_secure`,
//!   `trusted_proxies` = nginx's address, the healthcheck; every `EDGENODE_*`
//!   variable one that `edgenode --help` documents, and each node's
//!   environment resolved by the real configuration code; nginx's render
//!   arguments run through `deploy/render.sh` and the result through
//!   `nginx -t` (when nginx and openssl are installed).
//! - `Containerfile` read; and where podman (or a docker with a daemon) is
//!   installed, the image built from the static x86_64 musl binary and
//!   inspected: entrypoint, user, volume, port, environment, labels,
//!   healthcheck, size, the files in it and their owners, and the binary
//!   taken out of it answering a real node's `/api/ready`. Without podman or
//!   docker that part prints `SKIPPED: <reason>` and passes.

mod common;

use common::{free_port, signal, tempdir, wait_until, Node, BIN};
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The image is the binary (about 4 MB stripped) and three licence files.
const IMAGE_MAX_BYTES: u64 = 6_000_000;
const MUSL: &str = "x86_64-unknown-linux-musl";
/// The user the image runs as, and the owner of /data.
const USER: &str = "10001:10001";

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(Path::new(REPO).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Straight to stderr: libtest captures println!, and these lines must show.
fn tell(line: &str) {
    let _ = writeln!(std::io::stderr(), "\n{line}");
}

fn have_command(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
        .unwrap_or(false)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `edgenode healthcheck ARGS` with a clean environment plus `envs`:
/// (exit code, stdout, stderr, how long it took).
fn healthcheck(
    bin: &Path,
    args: &[&str],
    envs: &[(&str, &str)],
) -> (i32, String, String, Duration) {
    let mut cmd = Command::new(bin);
    cmd.arg("healthcheck").args(args).stdin(Stdio::null());
    for (k, _) in std::env::vars() {
        if k.starts_with("EDGENODE_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(envs.iter().copied());
    let started = Instant::now();
    let out = cmd.output().expect("run edgenode healthcheck");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        started.elapsed(),
    )
}

// ---- edgenode healthcheck -------------------------------------------------------

#[test]
fn healthcheck_exits_0_when_the_node_is_ready_and_1_otherwise() {
    let bin = Path::new(BIN);
    let mut node = Node::builder().args(["--drain-delay-ms", "5000"]).start();
    let port = node.port.to_string();

    // Flags.
    let (code, out, err, _) =
        healthcheck(bin, &["--config", "/dev/null", "--listen", &node.addr], &[]);
    assert_eq!(code, 0, "stdout {out:?} stderr {err:?}");
    assert_eq!(out.lines().count(), 1, "one line: {out:?}");
    assert!(out.starts_with("edgenode healthcheck: ready"), "{out:?}");
    assert!(err.is_empty(), "{err:?}");

    // The environment, as in the container image (EDGENODE_LISTEN).
    let (code, out, err, _) = healthcheck(
        bin,
        &[],
        &[
            ("EDGENODE_CONFIG", "/dev/null"),
            ("EDGENODE_LISTEN", &node.addr),
        ],
    );
    assert_eq!(code, 0, "{out}{err}");

    // The TOML file.
    let dir = tempdir();
    let file = dir.path().join("edgenode.toml");
    std::fs::write(&file, format!("listen = \"{}\"\n", node.addr)).unwrap();
    let (code, out, err, _) = healthcheck(bin, &["--config", file.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}{err}");

    // A wildcard listen address (the image's 0.0.0.0:8080) is probed on loopback.
    let wildcard = format!("0.0.0.0:{port}");
    let (code, out, err, _) =
        healthcheck(bin, &["--config", "/dev/null", "--listen", &wildcard], &[]);
    assert_eq!(code, 0, "{out}{err}");

    // Draining after SIGTERM: /api/ready answers 503, so: unhealthy.
    signal(node.pid(), libc::SIGTERM);
    let mut last = String::new();
    let unready = wait_until(Duration::from_secs(3), || {
        let (code, out, err, _) =
            healthcheck(bin, &["--config", "/dev/null", "--listen", &node.addr], &[]);
        last = format!("{code} {out}{err}");
        code == 1
    });
    assert!(unready, "a draining node stays healthy: {last}");
    assert!(last.contains("HTTP 503"), "{last}");
    assert_eq!(last.trim_end().lines().count(), 1, "one line: {last:?}");
    assert!(node.terminate().success());

    // Nothing listens: 1, at once.
    let nobody = format!("127.0.0.1:{}", free_port());
    let (code, out, err, took) =
        healthcheck(bin, &["--config", "/dev/null", "--listen", &nobody], &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(
        err.starts_with("edgenode healthcheck: not ready"),
        "{err:?}"
    );
    assert!(took < Duration::from_secs(2), "{took:?}");

    // A configuration that does not resolve: 1 (never 2, which Docker reserves).
    let (code, _, err, _) = healthcheck(bin, &["--config", "/nonexistent/edgenode.toml"], &[]);
    assert_eq!(code, 1, "{err}");
    let (code, _, err, _) = healthcheck(bin, &["--no-such-flag"], &[]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
}

#[test]
fn help_documents_the_healthcheck_subcommand() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("edgenode healthcheck"), "{help}");
    let out = Command::new(BIN)
        .args(["healthcheck", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("Usage: edgenode healthcheck"));
}

// ---- compose.yaml --------------------------------------------------------------------

/// Every `EDGENODE_*` variable `edgenode --help` documents.
fn documented_env_vars() -> BTreeSet<String> {
    let out = Command::new(BIN)
        .arg("--help")
        .output()
        .expect("edgenode --help");
    env_names(&String::from_utf8_lossy(&out.stdout))
}

fn env_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("EDGENODE_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].trim_end_matches('_').to_string());
        rest = &tail[end..];
    }
    names
}

/// compose.yaml as JSON: this file's reader, checked against python3's yaml
/// module when it is installed.
fn compose() -> Value {
    let source = repo_file("compose.yaml");
    let ours = yaml::parse(&source).unwrap_or_else(|e| panic!("compose.yaml: {e}"));
    let python = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)",
        ])
        .stdin(std::fs::File::open(Path::new(REPO).join("compose.yaml")).unwrap())
        .output();
    match python {
        Ok(o) if o.status.success() => {
            let theirs: Value = serde_json::from_slice(&o.stdout).expect("python's JSON");
            assert_eq!(
                ours,
                yaml::scalars_as_strings(theirs),
                "this file's YAML reader and python's yaml read compose.yaml differently"
            );
        }
        Ok(o) => tell(&format!(
            "compose.yaml: read by this test's YAML reader only (python3 yaml: {})",
            text(&o).lines().last().unwrap_or("")
        )),
        Err(e) => tell(&format!(
            "compose.yaml: read by this test's YAML reader only (no python3: {e})"
        )),
    }
    ours
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(s)
        .collect()
}

#[test]
fn compose_file_describes_the_three_node_cluster() {
    let c = compose();
    let services = c["services"].as_object().expect("services");
    let names: BTreeSet<&str> = services.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        BTreeSet::from(["redis", "node1", "node2", "node3", "nginx"])
    );
    let volumes = c["volumes"].as_object().expect("top-level volumes");
    let networks = c["networks"].as_object().expect("top-level networks");
    let documented = documented_env_vars();
    assert!(documented.contains("EDGENODE_REDIS_URL"), "{documented:?}");

    // Every EDGENODE_* name anywhere in the file is a real setting.
    let named = env_names(&repo_file("compose.yaml"));
    let unknown: Vec<_> = named.difference(&documented).collect();
    assert!(
        unknown.is_empty(),
        "compose.yaml names settings `edgenode --help` does not document: {unknown:?}"
    );

    // Redis: persistence on its own volume, reachable from the nodes only.
    let redis = &services["redis"];
    let cmd = strings(&redis["command"]);
    let appendonly = cmd
        .iter()
        .position(|a| *a == "--appendonly")
        .expect("--appendonly");
    assert_eq!(cmd[appendonly + 1], "yes");
    let redis_volume = strings(&redis["volumes"])[0].split(':').collect::<Vec<_>>();
    assert_eq!(
        redis_volume[1], "/data",
        "the redis image keeps its files in /data"
    );
    assert!(volumes.contains_key(redis_volume[0]), "{redis_volume:?}");
    assert_eq!(strings(&redis["networks"]), ["back"]);
    assert_eq!(
        networks["back"]["internal"], "true",
        "Redis gets no route out"
    );
    assert!(redis.get("ports").is_none(), "Redis is never published");

    // nginx: its fixed address is the nodes' one trusted proxy.
    let nginx = &services["nginx"];
    let nginx_ip = s(&nginx["networks"]["front"]["ipv4_address"]);
    let subnet = s(&networks["front"]["ipam"]["config"][0]["subnet"]);
    assert!(in_subnet(nginx_ip, subnet), "{nginx_ip} in {subnet}");

    // The three nodes.
    let mut node_ips = Vec::new();
    let mut data_volumes = BTreeSet::new();
    let mut redis_urls = BTreeSet::new();
    for n in ["node1", "node2", "node3"] {
        let node = &services[n];
        assert_eq!(
            s(&node["image"]),
            "localhost/edgenode:latest",
            "{n}: the tag README.md builds"
        );
        let env = node["environment"]
            .as_object()
            .unwrap_or_else(|| panic!("{n}: environment"));
        assert_eq!(s(&env["EDGENODE_INSTANCE_ID"]), n);
        assert_eq!(
            s(&env["EDGENODE_COOKIE_SECURE"]),
            "true",
            "{n}: browsers get HTTPS only"
        );
        assert_eq!(
            s(&env["EDGENODE_TRUSTED_PROXIES"]),
            nginx_ip,
            "{n}: trust exactly the balancer"
        );
        assert!(
            !env.contains_key("EDGENODE_API_TOKEN"),
            "{n}: the token belongs in the env file"
        );
        redis_urls.insert(s(&env["EDGENODE_REDIS_URL"]).to_string());
        assert_eq!(
            strings(&node["env_file"]),
            ["edgenode.env"],
            "{n}: the token's file"
        );
        let vols = strings(&node["volumes"]);
        assert_eq!(vols.len(), 1, "{n}: {vols:?}");
        let (vol, target) = vols[0].split_once(':').unwrap();
        assert_eq!(target, "/data", "{n}: the image's data directory");
        assert!(volumes.contains_key(vol), "{n}: volume {vol} not declared");
        assert!(
            data_volumes.insert(vol),
            "{n}: volume {vol} shared with another node"
        );
        assert_eq!(
            strings(&node["healthcheck"]["test"]),
            ["CMD", "/edgenode", "healthcheck"],
            "{n}"
        );
        assert!(
            node.get("ports").is_none(),
            "{n}: nodes are reached through nginx"
        );
        let ip = s(&node["networks"]["front"]["ipv4_address"]);
        assert!(in_subnet(ip, subnet), "{n}: {ip} in {subnet}");
        assert!(
            node["networks"].get("back").is_some(),
            "{n}: must reach Redis"
        );
        assert_eq!(
            nginx["depends_on"][n]["condition"], "service_healthy",
            "nginx waits for {n}'s healthcheck"
        );
        node_ips.push(ip.to_string());

        // The environment goes through the real configuration code: the
        // healthcheck resolves it and only then fails to connect.
        let mut envs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), s(v))).collect();
        envs.push(("EDGENODE_API_TOKEN", "x"));
        envs.push(("EDGENODE_CONFIG", "/dev/null"));
        let nobody = format!("127.0.0.1:{}", free_port());
        envs.push(("EDGENODE_LISTEN", &nobody));
        let (code, _, err, _) = healthcheck(Path::new(BIN), &[], &envs);
        assert_eq!(code, 1);
        assert!(
            err.contains("not ready"),
            "{n}: its environment does not resolve: {err}"
        );
    }
    assert_eq!(redis_urls.len(), 1, "one Redis for all: {redis_urls:?}");
    let url = redis_urls.first().unwrap();
    assert!(url.starts_with("redis://redis:6379/"), "{url}");
    assert_eq!(data_volumes.len(), 3);

    // nginx: the shipped template rendered by the shipped script.
    let entry = strings(&nginx["entrypoint"]);
    assert!(
        entry[2].contains(
            "sh /edgenode-deploy/render.sh /edgenode-deploy/nginx.conf /etc/nginx/nginx.conf \"$$@\""
        ) && entry[2].contains("exec nginx -g \"daemon off;\""),
        "{entry:?}"
    );
    let mounts = strings(&nginx["volumes"]);
    for (host, target) in [
        ("./deploy/nginx.conf", "/edgenode-deploy/nginx.conf:ro"),
        ("./deploy/render.sh", "/edgenode-deploy/render.sh:ro"),
    ] {
        assert!(
            mounts.contains(&format!("{host}:{target}").as_str()),
            "{mounts:?}"
        );
        assert!(Path::new(REPO).join(host).is_file(), "{host}");
    }
    let args = strings(&nginx["command"]);
    let arg = |k: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("nginx: no {k}= in {args:?}"))
    };
    for (i, ip) in node_ips.iter().enumerate() {
        assert_eq!(
            arg(&format!("NODE{}", i + 1)),
            format!("{ip}:8080"),
            "by IP: see deploy/nginx.conf"
        );
    }
    for key in ["TLS_CERT", "TLS_KEY"] {
        let path = arg(key);
        assert!(
            mounts.iter().any(|m| m.starts_with("./tls:")
                && path.starts_with(&format!("{}/", m.split(':').nth(1).unwrap()))),
            "{key}={path} is not in the operator's mounted ./tls: {mounts:?}"
        );
    }
    let ports = strings(&nginx["ports"]);
    assert!(
        ports.contains(&"443:443") && ports.contains(&"80:80"),
        "{ports:?}"
    );
    let internal_port = arg("INTERNAL_LISTEN").rsplit(':').next().unwrap();
    assert!(
        ports.contains(&format!("127.0.0.1:{internal_port}:{internal_port}").as_str()),
        "the internal listener is published on the host's loopback only: {ports:?}"
    );

    // Exactly those arguments fill every placeholder of the template...
    let dir = tempdir();
    let rendered = dir.path().join("nginx.conf");
    let out = render(&args, &rendered);
    assert!(out.status.success(), "render.sh: {}", text(&out));
    assert!(out.stderr.is_empty(), "render.sh warns: {}", text(&out));
    // ... and, with this machine's paths for the certificate, the run
    // directory and the logs, nginx accepts the result.
    if !(have_command("nginx") && have_command("openssl")) {
        tell("compose.yaml: nginx -t not run (nginx or openssl is not installed; scripts/test.sh installs both)");
        return;
    }
    let (cert, key) = self_signed_cert(dir.path());
    let here: Vec<String> = args
        .iter()
        .map(|a| match a.split_once('=').unwrap().0 {
            "TLS_CERT" => format!("TLS_CERT={}", cert.display()),
            "TLS_KEY" => format!("TLS_KEY={}", key.display()),
            "RUNDIR" | "TEMPDIR" | "LOGDIR" => {
                format!("{}={}", a.split('=').next().unwrap(), dir.path().display())
            }
            _ => a.to_string(),
        })
        .collect();
    let here: Vec<&str> = here.iter().map(String::as_str).collect();
    let out = render(&here, &rendered);
    assert!(out.status.success(), "render.sh: {}", text(&out));
    let prefix = format!("{}/", dir.path().display());
    let out = Command::new("nginx")
        .args(["-t", "-p", &prefix, "-c"])
        .arg(&rendered)
        .output()
        .expect("nginx -t");
    assert!(
        out.status.success(),
        "nginx -t on compose.yaml's values: {}",
        text(&out)
    );
}

fn render(args: &[&str], out: &Path) -> Output {
    Command::new("sh")
        .arg(Path::new(REPO).join("deploy/render.sh"))
        .arg(Path::new(REPO).join("deploy/nginx.conf"))
        .arg(out)
        .args(args)
        .output()
        .expect("run deploy/render.sh")
}

fn self_signed_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("fullchain.pem"), dir.join("privkey.pem"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args([
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=edgenode-test",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(out.status.success(), "openssl req: {}", text(&out));
    (cert, key)
}

/// Whether IPv4 `ip` lies in `a.b.c.d/len`.
fn in_subnet(ip: &str, subnet: &str) -> bool {
    let (net, len) = subnet.split_once('/').expect("a CIDR");
    let (ip, net): (std::net::Ipv4Addr, std::net::Ipv4Addr) =
        (ip.parse().unwrap(), net.parse().unwrap());
    let len: u32 = len.parse().unwrap();
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from(ip) & mask == u32::from(net) & mask
}

// ---- Containerfile ----------------------------------------------------------------------

/// The Containerfile's instructions, continuation lines joined, comments out.
fn instructions() -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in repo_file("Containerfile").lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(l) => current.push_str(l),
            None => {
                current.push_str(line);
                if !current.trim().is_empty() {
                    out.push(current.split_whitespace().collect::<Vec<_>>().join(" "));
                }
                current.clear();
            }
        }
    }
    out
}

#[test]
fn containerfile_declares_a_static_rootless_image() {
    let ins = instructions();
    let has = |want: &str| ins.iter().any(|i| i == want);
    assert_eq!(ins[0], "FROM scratch", "{ins:#?}");
    assert!(
        ins.iter().filter(|i| i.starts_with("FROM ")).count() == 1,
        "{ins:#?}"
    );
    for want in [
        "COPY ${BINARY} /edgenode",
        "USER 10001:10001",
        "ENV EDGENODE_LISTEN=0.0.0.0:8080 EDGENODE_DATA_DIR=/data",
        "VOLUME [\"/data\"]",
        "EXPOSE 8080",
        "HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 CMD [\"/edgenode\", \"healthcheck\"]",
        "ENTRYPOINT [\"/edgenode\"]",
        &format!("ARG VERSION={VERSION}"),
        &format!("ARG BINARY=target/{MUSL}/release/edgenode"),
    ] {
        assert!(has(want), "Containerfile lacks `{want}`:\n{ins:#?}");
    }
    let label = ins.iter().find(|i| i.starts_with("LABEL ")).expect("LABEL");
    for key in ["title", "version", "licenses", "source", "description"] {
        assert!(
            label.contains(&format!("org.opencontainers.image.{key}=")),
            "{label}"
        );
    }
    assert!(
        label.contains("org.opencontainers.image.licenses=\"MIT\""),
        "{label}"
    );
    let unknown: Vec<_> = env_names(&repo_file("Containerfile"))
        .difference(&documented_env_vars())
        .cloned()
        .collect();
    assert!(
        unknown.is_empty(),
        "Containerfile names undocumented settings: {unknown:?}"
    );
    // /data exists, owned by the user, before it is declared a volume.
    let data = ins
        .iter()
        .position(|i| i.starts_with("COPY --chown=10001:10001 ") && i.contains(" /data/"))
        .expect("/data owned by 10001");
    let volume = ins.iter().position(|i| i.starts_with("VOLUME")).unwrap();
    assert!(data < volume);
    // The labels after the binary: podman 4's cache keys a LABEL layer on
    // its text, not on the --build-arg values in it.
    let binary = ins.iter().position(|i| i.contains("${BINARY}")).unwrap();
    let label_at = ins.iter().position(|i| i.starts_with("LABEL ")).unwrap();
    assert!(binary < label_at, "LABEL must follow COPY ${{BINARY}}");
    // Every other file copied is in the repository and let through .dockerignore.
    let ignore = repo_file(".dockerignore");
    for i in ins
        .iter()
        .filter(|i| i.starts_with("COPY ") && !i.contains("${BINARY}"))
    {
        let words: Vec<&str> = i.split(' ').filter(|w| !w.starts_with("--")).collect();
        for src in &words[1..words.len() - 1] {
            assert!(Path::new(REPO).join(src).is_file(), "{src}");
            assert!(
                ignore.lines().any(|l| l == format!("!{src}")),
                ".dockerignore keeps {src} out"
            );
        }
    }
}

// ---- the image ----------------------------------------------------------------------------

/// podman, or docker with a daemon that answers; `Err(reason)` when neither.
fn container_engine() -> Result<&'static str, String> {
    let mut reasons = Vec::new();
    for engine in ["podman", "docker"] {
        if !have_command(engine) {
            continue;
        }
        match Command::new(engine)
            .arg("info")
            .stdin(Stdio::null())
            .output()
        {
            Ok(o) if o.status.success() => return Ok(engine),
            Ok(o) => reasons.push(format!(
                "`{engine} info` fails: {}",
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .next()
                    .unwrap_or("")
            )),
            Err(e) => reasons.push(format!("{engine}: {e}")),
        }
    }
    if reasons.is_empty() {
        Err("neither podman nor docker is installed".into())
    } else {
        Err(reasons.join("; "))
    }
}

/// The static x86_64 musl release binary, built like release_qemu's (the
/// outer `cargo test` keeps target/ locked, so the nested cargo builds in
/// target/cross, inside the build context).
fn musl_binary() -> PathBuf {
    let root = Path::new(REPO);
    let sysroot = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    assert!(
        Path::new(&sysroot).join("lib/rustlib").join(MUSL).exists(),
        "the rustup target {MUSL} is missing: `rustup target add {MUSL}` \
         (scripts/test.sh adds it when podman or docker is installed)"
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let started = Instant::now();
    let out = Command::new(cargo)
        .current_dir(root)
        .env("CARGO_TARGET_DIR", root.join("target/cross"))
        .args(["build", "--release", "--locked", "--target", MUSL])
        .stdin(Stdio::null())
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "musl build failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    tell(&format!(
        "containers: {MUSL} release build {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    root.join("target/cross")
        .join(MUSL)
        .join("release/edgenode")
}

/// Whether an ELF file asks for a program interpreter (is dynamically linked).
fn has_interpreter(bin: &[u8]) -> bool {
    assert_eq!(&bin[..4], b"\x7fELF");
    assert_eq!(bin[4], 2, "64-bit");
    let u16_at = |o: usize| u16::from_le_bytes([bin[o], bin[o + 1]]) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(bin[o..o + 4].try_into().unwrap());
    let phoff = u64::from_le_bytes(bin[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    const PT_INTERP: u32 = 3;
    (0..phnum).any(|i| u32_at(phoff + i * phentsize) == PT_INTERP)
}

/// Removes the test's container and image, whatever happens.
struct Cleanup {
    engine: &'static str,
    image: String,
    container: Option<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(c) = &self.container {
            let _ = Command::new(self.engine).args(["rm", "-f", c]).output();
        }
        let _ = Command::new(self.engine)
            .args(["rmi", "-f", &self.image])
            .output();
    }
}

#[test]
fn the_image_builds_and_holds_what_it_declares() {
    let engine = match container_engine() {
        Ok(e) => e,
        Err(reason) => {
            tell(&format!(
                "SKIPPED: the container image is not built here: {reason}"
            ));
            return;
        }
    };
    let binary = musl_binary();
    let bytes = std::fs::read(&binary).unwrap();
    assert!(
        !has_interpreter(&bytes),
        "{} is not static: it cannot run FROM scratch",
        binary.display()
    );

    let image = format!("localhost/edgenode-test:{}", std::process::id());
    let mut cleanup = Cleanup {
        engine,
        image: image.clone(),
        container: None,
    };
    let relative = binary.strip_prefix(REPO).unwrap().display().to_string();
    let mut build = Command::new(engine);
    build.current_dir(REPO).arg("build");
    if engine == "podman" {
        build.args(["--format", "docker"]); // keeps the HEALTHCHECK
    }
    // podman 4's layer cache ignores changed --build-arg values; and no
    // intermediate images left behind.
    build.arg("--no-cache");
    if engine == "podman" {
        build.arg("--layers=false");
    }
    build
        .args(["--build-arg", &format!("BINARY={relative}")])
        .args(["--build-arg", "SOURCE=https://example.invalid/edgenode"])
        .args(["-f", "Containerfile", "-t", &image, "."])
        .stdin(Stdio::null());
    let started = Instant::now();
    let out = build.output().expect("run the image build");
    assert!(out.status.success(), "{engine} build:\n{}", text(&out));
    let build_secs = started.elapsed().as_secs_f64();

    let out = Command::new(engine)
        .args(["image", "inspect", &image])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let inspect: Value = serde_json::from_slice(&out.stdout).expect("inspect JSON");
    let img = &inspect[0];
    let config = &img["Config"];
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/edgenode"]),
        "{config:#}"
    );
    assert!(
        config["Cmd"].is_null() || config["Cmd"] == serde_json::json!([]),
        "{config:#}"
    );
    assert_eq!(config["User"], USER);
    assert!(config["Volumes"].get("/data").is_some(), "{config:#}");
    assert!(
        config["ExposedPorts"].get("8080/tcp").is_some(),
        "{config:#}"
    );
    let env = strings(&config["Env"]);
    for want in ["EDGENODE_LISTEN=0.0.0.0:8080", "EDGENODE_DATA_DIR=/data"] {
        assert!(env.contains(&want), "{env:?}");
    }
    let labels = &config["Labels"];
    for (k, v) in [
        ("title", "edgenode"),
        ("version", VERSION),
        ("licenses", "MIT"),
        ("source", "https://example.invalid/edgenode"),
    ] {
        assert_eq!(
            labels[format!("org.opencontainers.image.{k}")],
            v,
            "{labels:#}"
        );
    }
    // docker: Config.Healthcheck; podman: Healthcheck next to Config.
    let health = [&config["Healthcheck"], &img["Healthcheck"]]
        .into_iter()
        .find(|h| h.is_object())
        .unwrap_or_else(|| panic!("no healthcheck (podman needs --format docker): {img:#}"));
    assert_eq!(
        health["Test"],
        serde_json::json!(["CMD", "/edgenode", "healthcheck"]),
        "{img:#}"
    );
    assert_eq!(img["Os"], "linux");
    assert_eq!(img["Architecture"], "amd64");
    let size = img["Size"].as_u64().expect("Size");
    assert!(
        size < IMAGE_MAX_BYTES,
        "image {size} bytes, bound {IMAGE_MAX_BYTES}"
    );

    // Its files, without running it: create (not start) a container and export it.
    let out = Command::new(engine)
        .args(["create", &image])
        .output()
        .unwrap();
    assert!(out.status.success(), "{engine} create: {}", text(&out));
    let container = String::from_utf8_lossy(&out.stdout).trim().to_string();
    cleanup.container = Some(container.clone());
    let dir = tempdir();
    let tar = dir.path().join("rootfs.tar");
    let out = Command::new(engine)
        .args(["export", "-o"])
        .arg(&tar)
        .arg(&container)
        .output()
        .unwrap();
    assert!(out.status.success(), "{engine} export: {}", text(&out));
    let out = Command::new("tar")
        .args(["--numeric-owner", "-tvf"])
        .arg(&tar)
        .output()
        .unwrap();
    assert!(out.status.success(), "tar: {}", text(&out));
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    // "mode uid/gid size date time name"
    let entries: Vec<(String, String, u64, String)> = listing
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].into(),
                f[1].into(),
                f[2].parse().unwrap(),
                f[5..].join(" ").trim_end_matches('/').into(),
            )
        })
        .collect();
    let entry = |name: &str| {
        entries
            .iter()
            .find(|e| e.3 == name)
            .unwrap_or_else(|| panic!("{name} missing from the image:\n{listing}"))
    };
    let (mode, owner, _, _) = entry("edgenode");
    assert_eq!(
        (mode.as_str(), owner.as_str()),
        ("-rwxr-xr-x", "0/0"),
        "the binary is not the user's to change"
    );
    let (mode, owner, _, _) = entry("data");
    assert!(mode.starts_with('d'), "{mode}");
    assert_eq!(
        owner,
        &USER.replace(':', "/"),
        "/data must be the node's: a new volume copies its owner"
    );
    let expected = [
        "edgenode",
        "licenses/edgenode/LICENSE",
        "licenses/sled/LICENSE-MIT",
        "licenses/sled/LICENSE-APACHE",
        "data/README.edgenode",
    ];
    for e in expected {
        entry(e);
    }
    let extra: Vec<_> = entries
        .iter()
        .filter(|(mode, _, size, name)| {
            mode.starts_with('-') && !expected.contains(&name.as_str()) && *size > 0
        })
        .collect();
    assert!(
        extra.is_empty(),
        "files the Containerfile did not put there: {extra:?}"
    );

    // The binary in the image is the one built, and it works: its
    // healthcheck answers for a real node.
    let out = Command::new("tar")
        .arg("-xf")
        .arg(&tar)
        .arg("-C")
        .arg(dir.path())
        .arg("edgenode")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let inside = dir.path().join("edgenode");
    assert!(
        std::fs::read(&inside).unwrap() == bytes,
        "the image holds another binary"
    );
    let version = Command::new(&inside).arg("--version").output().unwrap();
    let version = String::from_utf8_lossy(&version.stdout).into_owned();
    assert!(
        version.starts_with(&format!("edgenode {VERSION} ({MUSL}")),
        "{version}"
    );
    let node = Node::start();
    let (code, out, err, _) = healthcheck(
        &inside,
        &["--config", "/dev/null", "--listen", &node.addr],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    drop(node);

    tell(&format!(
        "containers: {engine} build {build_secs:.1} s; image {size} bytes ({:.2} MB, bound {:.0} MB); \
         binary {} bytes; user {USER}, /data owned by {USER}",
        size as f64 / 1e6,
        IMAGE_MAX_BYTES as f64 / 1e6,
        bytes.len()
    ));
}

/// A reader for the block-YAML subset compose.yaml is written in: block
/// mappings and sequences indented with spaces, `- key: value` items, flow
/// sequences of scalars, `{}`, plain, single- and double-quoted scalars and
/// comments. Anything else (anchors, tags, block scalars, tabs, duplicate
/// keys, the YAML 1.1 booleans yes/no/on/off that YAML 1.2 reads as strings)
/// is an error, so the file means the same to every compose implementation.
/// Scalars stay strings (`null`/`~`/nothing are null).
mod yaml {
    use serde_json::{Map, Value};

    struct Line {
        no: usize,
        indent: usize,
        text: String,
    }

    pub fn parse(src: &str) -> Result<Value, String> {
        let mut lines = Vec::new();
        for (i, raw) in src.lines().enumerate() {
            let no = i + 1;
            let content = raw.trim_start_matches(' ');
            if content.starts_with('\t') {
                return Err(format!("line {no}: tab in indentation"));
            }
            let text = strip_comment(content).trim_end().to_string();
            if text.is_empty() {
                continue;
            }
            if text == "---" || text == "..." {
                return Err(format!("line {no}: one document only"));
            }
            lines.push(Line {
                no,
                indent: raw.len() - content.len(),
                text,
            });
        }
        if lines.is_empty() {
            return Ok(Value::Null);
        }
        let mut i = 0;
        let indent = lines[0].indent;
        let v = block(&mut lines, &mut i, indent)?;
        match lines.get(i) {
            Some(l) => Err(format!("line {}: unexpected indentation", l.no)),
            None => Ok(v),
        }
    }

    /// The text before a comment (`#` at the start or after a space, outside quotes).
    fn strip_comment(s: &str) -> &str {
        let (mut single, mut double, mut prev) = (false, false, ' ');
        for (i, c) in s.char_indices() {
            match c {
                '\'' if !double => single = !single,
                '"' if !single && prev != '\\' => double = !double,
                '#' if !single && !double && prev == ' ' => return &s[..i],
                _ => {}
            }
            prev = c;
        }
        s
    }

    fn block(lines: &mut [Line], i: &mut usize, indent: usize) -> Result<Value, String> {
        if lines[*i].text == "-" || lines[*i].text.starts_with("- ") {
            sequence(lines, i, indent)
        } else {
            mapping(lines, i, indent)
        }
    }

    fn sequence(lines: &mut [Line], i: &mut usize, indent: usize) -> Result<Value, String> {
        let mut items = Vec::new();
        while *i < lines.len() && lines[*i].indent == indent {
            let (no, text) = (lines[*i].no, lines[*i].text.clone());
            let Some(rest) = text.strip_prefix('-') else {
                return Err(format!("line {no}: a mapping key among list items"));
            };
            let content = rest.trim_start();
            if content.is_empty() {
                *i += 1;
                items.push(nested(lines, i, indent, no)?);
            } else if key_value(content)?.is_some() {
                // "- key: value": a mapping that starts on the dash's line.
                lines[*i].indent += text.len() - content.len();
                lines[*i].text = content.to_string();
                let inner = lines[*i].indent;
                items.push(mapping(lines, i, inner)?);
            } else {
                items.push(value(content).map_err(|e| format!("line {no}: {e}"))?);
                *i += 1;
            }
        }
        Ok(Value::Array(items))
    }

    /// The block under a line that ends in `:` or `-`: deeper lines, or null.
    fn nested(
        lines: &mut [Line],
        i: &mut usize,
        indent: usize,
        no: usize,
    ) -> Result<Value, String> {
        match lines.get(*i) {
            Some(next) if next.indent > indent => {
                let inner = next.indent;
                block(lines, i, inner)
            }
            Some(next) if next.indent == indent && next.text.starts_with('-') => {
                Err(format!("line {}: indent the list under line {no}", next.no))
            }
            _ => Ok(Value::Null),
        }
    }

    fn mapping(lines: &mut [Line], i: &mut usize, indent: usize) -> Result<Value, String> {
        let mut map = Map::new();
        while *i < lines.len() && lines[*i].indent == indent {
            let no = lines[*i].no;
            let Some((key, rest)) = key_value(&lines[*i].text)? else {
                return Err(format!(
                    "line {no}: expected `key: value`: {}",
                    lines[*i].text
                ));
            };
            if map.contains_key(&key) {
                return Err(format!("line {no}: duplicate key {key}"));
            }
            *i += 1;
            let v = if rest.is_empty() {
                nested(lines, i, indent, no)?
            } else {
                value(&rest).map_err(|e| format!("line {no}: {e}"))?
            };
            map.insert(key, v);
        }
        Ok(Value::Object(map))
    }

    /// `key: rest` or `key:` (outside quotes); `None` when the line is not one.
    fn key_value(s: &str) -> Result<Option<(String, String)>, String> {
        let (mut single, mut double) = (false, false);
        let b = s.as_bytes();
        for (i, &c) in b.iter().enumerate() {
            match c {
                b'\'' if !double => single = !single,
                b'"' if !single => double = !double,
                b':' if !single && !double && (i + 1 == b.len() || b[i + 1] == b' ') => {
                    if s.starts_with('[') || s.starts_with('{') {
                        return Ok(None);
                    }
                    let key = match value(s[..i].trim())? {
                        Value::String(k) => k,
                        other => return Err(format!("key {other} is not a string")),
                    };
                    return Ok(Some((key, s[i + 1..].trim().to_string())));
                }
                _ => {}
            }
        }
        Ok(None)
    }

    fn value(s: &str) -> Result<Value, String> {
        if s == "{}" {
            return Ok(Value::Object(Map::new()));
        }
        if let Some(inner) = s.strip_prefix('[') {
            let inner = inner.strip_suffix(']').ok_or(format!("unclosed [: {s}"))?;
            let mut items = Vec::new();
            let (mut start, mut single, mut double) = (0, false, false);
            let b = inner.as_bytes();
            for i in 0..=b.len() {
                match b.get(i) {
                    Some(b'\'') if !double => single = !single,
                    Some(b'"') if !single && (i == 0 || b[i - 1] != b'\\') => double = !double,
                    Some(b',') | None if !single && !double => {
                        let item = inner[start..i].trim();
                        if item.is_empty() {
                            if b.is_empty() {
                                break;
                            }
                            return Err(format!("empty item in {s}"));
                        }
                        items.push(scalar(item)?);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            return Ok(Value::Array(items));
        }
        scalar(s)
    }

    fn scalar(s: &str) -> Result<Value, String> {
        if let Some(inner) = s.strip_prefix('\'') {
            let inner = inner.strip_suffix('\'').ok_or(format!("unclosed ': {s}"))?;
            if inner.replace("''", "").contains('\'') {
                return Err(format!("stray ' in {s}"));
            }
            return Ok(Value::String(inner.replace("''", "'")));
        }
        if let Some(inner) = s.strip_prefix('"') {
            let inner = inner.strip_suffix('"').ok_or(format!("unclosed \": {s}"))?;
            let mut out = String::new();
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some('\\') => out.push('\\'),
                        Some('"') => out.push('"'),
                        Some('n') => out.push('\n'),
                        Some('t') => out.push('\t'),
                        other => return Err(format!("unsupported escape \\{other:?} in {s}")),
                    },
                    '"' => return Err(format!("stray \" in {s}")),
                    c => out.push(c),
                }
            }
            return Ok(Value::String(out));
        }
        if s.starts_with([
            '&', '*', '!', '|', '>', '%', '@', '`', '{', '[', ']', '}', ',', '?',
        ]) || s.contains(": ")
            || s.contains(" #")
        {
            return Err(format!("outside the supported YAML subset: {s}"));
        }
        if ["yes", "no", "on", "off"].contains(&s.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "quote {s}: YAML 1.1 reads it as a boolean, YAML 1.2 as a string"
            ));
        }
        if s == "~" || s == "null" {
            return Ok(Value::Null);
        }
        Ok(Value::String(s.to_string()))
    }

    /// A parsed document with every scalar as this reader gives it (a
    /// string), for comparing with a full YAML parser's output.
    pub fn scalars_as_strings(v: Value) -> Value {
        match v {
            Value::Bool(b) => Value::String(b.to_string()),
            Value::Number(n) => Value::String(n.to_string()),
            Value::Array(a) => Value::Array(a.into_iter().map(scalars_as_strings).collect()),
            Value::Object(o) => Value::Object(
                o.into_iter()
                    .map(|(k, v)| (k, scalars_as_strings(v)))
                    .collect(),
            ),
            other => other,
        }
    }

    #[test]
    fn reads_the_subset_and_refuses_the_rest() {
        let v = parse("a:\n  - x: '1'\n    y: [\"p q\", r]\n  - -z\nb: {}\nc:\n").unwrap();
        assert_eq!(
            v,
            serde_json::json!({"a": [{"x": "1", "y": ["p q", "r"]}, "-z"], "b": {}, "c": null})
        );
        assert!(parse("a: 1\na: 2\n").is_err(), "duplicate key");
        assert!(parse("a: yes\n").is_err(), "yes");
        assert!(parse("a: &x 1\n").is_err(), "anchor");
        assert!(parse("a: |\n  x\n").is_err(), "block scalar");
        assert!(parse("a:\n\t- b\n").is_err(), "tab");
        assert!(parse("a:\n  b: 1\n c: 2\n").is_err(), "bad indentation");
    }
}
