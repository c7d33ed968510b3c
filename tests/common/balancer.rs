//! The shipped balancer templates (`deploy/nginx.conf`, `deploy/haproxy.cfg`)
//! rendered with `deploy/render.sh` as an operator would, and run in the
//! foreground on free loopback ports with a throw-away certificate. Stopped
//! (SIGTERM, so nginx flushes its buffered logs) when dropped.

use super::{free_port, signal, wait_until};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Kind {
    Nginx,
    Haproxy,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Nginx => "nginx",
            Kind::Haproxy => "haproxy",
        }
    }
}

pub struct Balancer {
    child: Child,
    pub kind: Kind,
    /// `https://127.0.0.1:PORT`: the browsers' listener.
    pub https: String,
    /// `http://127.0.0.1:PORT`: the back ends' listener.
    pub internal: String,
    /// The certificate it serves; clients trust it.
    pub cacert: PathBuf,
    /// Every file it logs to: nginx's error.log and access.log, HAProxy's
    /// stdout (its template logs there).
    pub logs: Vec<PathBuf>,
}

impl Balancer {
    /// Renders the template for three nodes, checks it (`nginx -t`,
    /// `haproxy -c`), starts it and waits until it forwards `/api/ready`.
    pub fn start(kind: Kind, nodes: [&str; 3], dir: &Path) -> Balancer {
        let (cert, key, pem) = self_signed_cert(dir);
        let port = || format!("127.0.0.1:{}", free_port());
        let (https, http, internal, status) = (port(), port(), port(), port());
        let here = dir.display().to_string();
        let mut vars = vec![
            ("NODE1", nodes[0].to_string()),
            ("NODE2", nodes[1].to_string()),
            ("NODE3", nodes[2].to_string()),
            ("HTTPS_LISTEN", https.clone()),
            ("HTTP_LISTEN", http),
            ("INTERNAL_LISTEN", internal.clone()),
            ("RUNDIR", here.clone()),
        ];
        let (template, conf) = match kind {
            Kind::Nginx => {
                vars.push(("STATUS_LISTEN", status));
                vars.push(("LOGDIR", here.clone()));
                vars.push(("TEMPDIR", here));
                vars.push(("TLS_CERT", cert.display().to_string()));
                vars.push(("TLS_KEY", key.display().to_string()));
                ("nginx.conf", dir.join("nginx.conf"))
            }
            Kind::Haproxy => {
                vars.push(("STATS_LISTEN", status));
                vars.push(("TLS_PEM", pem.display().to_string()));
                ("haproxy.cfg", dir.join("haproxy.cfg"))
            }
        };
        render(template, &conf, &vars);
        let prefix = format!("{}/", dir.display());
        let check = match kind {
            Kind::Nginx => Command::new("nginx")
                .args(["-t", "-p", &prefix, "-c"])
                .arg(&conf)
                .output(),
            Kind::Haproxy => Command::new("haproxy")
                .arg("-c")
                .arg("-f")
                .arg(&conf)
                .output(),
        }
        .expect("nginx and haproxy must be installed (scripts/test.sh installs them)");
        assert!(
            check.status.success(),
            "{} check: {}",
            kind.name(),
            String::from_utf8_lossy(&check.stderr)
        );
        let (child, logs) = match kind {
            Kind::Nginx => {
                let child = Command::new("nginx")
                    .args(["-p", &prefix, "-c"])
                    .arg(&conf)
                    .args(["-g", "daemon off;"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start nginx");
                (child, vec![dir.join("error.log"), dir.join("access.log")])
            }
            Kind::Haproxy => {
                let log = dir.join("haproxy.stdout");
                let child = Command::new("haproxy")
                    .arg("-db")
                    .arg("-f")
                    .arg(&conf)
                    .stdout(std::fs::File::create(&log).expect("haproxy log"))
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start haproxy");
                (child, vec![log])
            }
        };
        let lb = Balancer {
            child,
            kind,
            https: format!("https://{https}"),
            internal: format!("http://{internal}"),
            cacert: cert,
            logs,
        };
        let c = super::Client::new(lb.internal.clone());
        assert!(
            wait_until(Duration::from_secs(15), || c
                .try_request("GET", "/api/ready", &[], None)
                .map(|a| a.status == 200)
                .unwrap_or(false)),
            "{} did not come up",
            kind.name()
        );
        lb
    }

    /// The bytes of every log file it writes.
    pub fn log_bytes(&self) -> u64 {
        self.logs
            .iter()
            .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            .sum()
    }

    /// SIGTERM and wait: nginx's workers flush their buffered access log.
    pub fn stop(&mut self) {
        signal(self.child.id(), libc::SIGTERM);
        let exited = wait_until(Duration::from_secs(10), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        if !exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            self.stop();
        }
    }
}

/// Renders a template with `deploy/render.sh`, which refuses to leave a
/// placeholder unfilled; a KEY=VALUE whose placeholder the template does not
/// have (it only warns about that) fails here too.
pub fn render(template: &str, out: &Path, vars: &[(&str, String)]) {
    let mut cmd = Command::new("sh");
    cmd.arg(Path::new(REPO).join("deploy/render.sh"))
        .arg(Path::new(REPO).join("deploy").join(template))
        .arg(out);
    for (k, v) in vars {
        cmd.arg(format!("{k}={v}"));
    }
    let done = cmd.output().expect("run deploy/render.sh");
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success(), "render {template} failed: {stderr}");
    assert!(
        stderr.trim().is_empty(),
        "render {template} warned: {stderr}"
    );
}

/// A throw-away self-signed certificate for 127.0.0.1 in `dir`:
/// (certificate, key, both in one PEM for HAProxy).
pub fn self_signed_cert(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (cert, key, pem) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("cert+key.pem"),
    );
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=edgenode-test", "-addext"])
        .args(["subjectAltName=IP:127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl must be installed (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = |p: &Path| std::fs::read_to_string(p).expect("read certificate");
    std::fs::write(&pem, read(&cert) + &read(&key)).expect("write PEM");
    (cert, key, pem)
}
