//! A real Prometheus server (Debian's `/usr/bin/prometheus`) on a free
//! loopback port, its storage in a temp dir, and the few HTTP API calls the
//! monitoring tests make. Killed when dropped. Readiness is polled
//! (`/-/ready`), never slept for.

use super::{free_port, tempdir, wait_until};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const PROMETHEUS: &str = "/usr/bin/prometheus";
pub const PROMTOOL: &str = "/usr/bin/promtool";

pub struct Prometheus {
    child: Child,
    pub url: String,
    pub dir: tempfile::TempDir,
    log: PathBuf,
    agent: ureq::Agent,
}

impl Prometheus {
    /// Writes `config` (YAML, which may name files in [`Prometheus::dir`]'s
    /// path, passed to `config` as its argument) and starts Prometheus on it.
    pub fn start(config: impl FnOnce(&Path) -> String) -> Prometheus {
        let dir = tempdir();
        let conf = dir.path().join("prometheus.yml");
        std::fs::write(&conf, config(dir.path())).expect("write prometheus.yml");
        let log = dir.path().join("prometheus.log");
        let addr = format!("127.0.0.1:{}", free_port());
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", conf.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("prometheus log"))
            .spawn()
            .expect("prometheus must be installed (scripts/test.sh installs it)");
        let mut p = Prometheus {
            child,
            url: format!("http://{addr}"),
            dir,
            log,
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(10))
                .build(),
        };
        let ready = wait_until(Duration::from_secs(30), || {
            if matches!(p.child.try_wait(), Ok(Some(_))) {
                return true;
            }
            p.agent
                .get(&format!("{}/-/ready", p.url))
                .call()
                .map(|r| r.status() == 200)
                .unwrap_or(false)
        });
        let exited = matches!(p.child.try_wait(), Ok(Some(_)));
        assert!(
            ready && !exited,
            "prometheus did not become ready; log:\n{}",
            p.log_text()
        );
        p
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET an API path; the `data` of a `"status":"success"` answer.
    fn api(&self, path: &str, params: &[(&str, &str)]) -> Result<Value, String> {
        let mut req = self.agent.get(&format!("{}{path}", self.url));
        for (k, v) in params {
            req = req.query(k, v);
        }
        let resp = match req.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(code, r)) => {
                return Err(format!(
                    "{path}: {code} {}",
                    r.into_string().unwrap_or_default()
                ))
            }
            Err(e) => return Err(format!("{path}: {e}")),
        };
        let body: Value = resp
            .into_json()
            .map_err(|e| format!("{path}: not JSON: {e}"))?;
        if body["status"] != "success" {
            return Err(format!("{path}: {body}"));
        }
        Ok(body["data"].clone())
    }

    /// An instant query (`/api/v1/query`), evaluated now or at `time` (Unix
    /// seconds): the result's series (each `{"metric":…, "value":[t, "v"]}`).
    pub fn query(&self, expr: &str, time: Option<f64>) -> Result<Vec<Value>, String> {
        let t = time.map(|t| format!("{t:.3}"));
        let mut params = vec![("query", expr)];
        if let Some(t) = &t {
            params.push(("time", t));
        }
        let data = self.api("/api/v1/query", &params)?;
        match data["result"].as_array() {
            Some(v) if data["resultType"] == "vector" => Ok(v.clone()),
            _ => Err(format!("{expr}: not a vector: {data}")),
        }
    }

    /// The number of series `expr` returns now (0 when the query fails).
    pub fn count(&self, expr: &str) -> usize {
        self.query(expr, None).map(|v| v.len()).unwrap_or(0)
    }

    /// Active alerts (`/api/v1/alerts`): pending and firing.
    pub fn alerts(&self) -> Vec<Value> {
        self.api("/api/v1/alerts", &[])
            .ok()
            .and_then(|d| d["alerts"].as_array().cloned())
            .unwrap_or_default()
    }

    /// The instances for which alert `name` is pending or firing.
    pub fn alerting_instances(&self, name: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .alerts()
            .iter()
            .filter(|a| a["labels"]["alertname"] == name)
            .filter(|a| a["state"] == "pending" || a["state"] == "firing")
            .filter_map(|a| a["labels"]["instance"].as_str().map(String::from))
            .collect();
        v.sort();
        v
    }

    /// The loaded rule groups (`/api/v1/rules`).
    pub fn rule_groups(&self) -> Result<Vec<Value>, String> {
        let data = self.api("/api/v1/rules", &[])?;
        Ok(data["groups"].as_array().cloned().unwrap_or_default())
    }

    /// Every metric name Prometheus holds.
    pub fn metric_names(&self) -> Result<Vec<String>, String> {
        let data = self.api("/api/v1/label/__name__/values", &[])?;
        Ok(data
            .as_array()
            .map(|v| {
                v.iter()
                    .filter_map(|n| n.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
