//! Configuration: built-in defaults < TOML file < `EDGENODE_*` environment <
//! command-line flags.
//!
//! - [`keys`]: every key, declared once (flag, file key, environment name,
//!   default, `--help` text), and the [`Args`] clap and serde read.
//! - here: resolution (clap resolves flag-over-env; the file fills what
//!   neither set, [`Args::over`]; the table's defaults fill the rest) into
//!   [`Config`], with units (ms, MB) turned into the types the node uses,
//!   and its validation.
//! - [`settings`]: what each component takes, built from [`Config`], so
//!   the node only wires them together.

mod keys;
pub mod settings;

pub use keys::{Args, DEFAULT_CONFIG_FILE};
pub use settings::RedisTls;

use ipnet::IpNet;
use serde::Deserialize;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The longest TTL a cache value may have (30 days): every cache key in
/// Redis expires, and a namespace's generation key outlives its values by
/// being refreshed to this on every write.
pub const MAX_CACHE_TTL_SECS: u64 = 30 * 86_400;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Plain,
    Json,
}

/// `access_log`: which requests get a line of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AccessLog {
    Off,
    Sampled,
    Full,
}

impl AccessLog {
    pub fn as_str(self) -> &'static str {
        match self {
            AccessLog::Off => "off",
            AccessLog::Sampled => "sampled",
            AccessLog::Full => "full",
        }
    }
}

/// The resolved configuration the node runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub redis_url: Option<String>,
    pub key_prefix: String,
    pub store_timeout: Duration,
    pub redis_probe_interval: Duration,
    pub redis_probe_max: Duration,
    pub api_token: Option<String>,
    /// Tokens accepted as well as `api_token`, re-read on SIGHUP
    /// ([`crate::http::tokens`]).
    pub api_token_file: Option<PathBuf>,
    pub allow_unauthenticated: bool,
    pub instance_id: String,
    pub workers: usize,
    pub blocking_threads: usize,
    pub session_ttl_secs: u64,
    pub session_max_lifetime_secs: u64,
    pub max_metadata_bytes: usize,
    pub max_body_bytes: usize,
    pub cookie_secure: bool,
    pub trusted_proxies: Vec<IpNet>,
    pub max_connections: usize,
    pub max_in_flight: usize,
    /// Requests per second per client IP; 0 = no limit.
    pub rate_limit_per_ip: u32,
    pub rate_limit_burst: u32,
    pub cache_capacity_bytes: u64,
    pub max_journal_bytes: u64,
    pub min_free_bytes: u64,
    pub disk_flush_timeout: Duration,
    pub replay_batch: usize,
    pub near_cache_bytes: u64,
    pub touch_flush: Duration,
    pub near_admit: Duration,
    /// See the key `mirror_lag_secs`.
    pub mirror_lag_secs: u64,
    pub max_sessions_per_user: u64,
    pub max_sessions: u64,
    /// 0 = no limit.
    pub create_rate_per_ip: u32,
    pub require_redis: bool,
    /// 0 = a browser-session cookie.
    pub cookie_max_age_secs: u64,
    pub header_timeout: Duration,
    pub request_timeout: Duration,
    pub shutdown_grace: Duration,
    pub drain_delay: Duration,
    /// The shared cache's Redis: `cache_redis_url`, else `redis_url`.
    pub cache_redis_url: Option<String>,
    /// TLS to Redis: the files of `rediss://` URLs (both Redis URLs).
    pub redis_tls: RedisTls,
    pub cache_ttl_secs: u64,
    pub max_cache_value_bytes: usize,
    pub cache_memory_bytes: u64,
    pub cache_disk_bytes: u64,
    pub cache_lease_wait: Duration,
    pub cache_lease_ttl: Duration,
    pub log_format: LogFormat,
    pub log_level: tracing::Level,
    pub access_log: AccessLog,
    /// With `AccessLog::Sampled`, one request in this many (at least 1).
    pub access_log_sample: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("config: {0}")]
    Invalid(String),
}

impl Config {
    /// Resolves the configuration from parsed arguments (which already carry
    /// the environment), the config file, and the defaults.
    pub fn resolve(args: Args) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => {
                read_file(Path::new(DEFAULT_CONFIG_FILE))?
            }
            None => Args::default(),
        };
        let v = args.over(file)?.values();
        let redis_url = v.redis_url.filter(|u| !u.is_empty());
        let mb = |n: u64| n.saturating_mul(1024 * 1024);
        // With Redis, sled holds only the mirror (see `cache_capacity_mb`).
        let sled_cache_mb = v
            .cache_capacity_mb
            .unwrap_or(if redis_url.is_some() { 1 } else { 2 });
        let config = Config {
            listen: v.listen,
            data_dir: v.data_dir,
            // The cache's Redis defaults to the sessions' (an empty value
            // means unset, as for redis_url).
            cache_redis_url: v
                .cache_redis_url
                .filter(|u| !u.is_empty())
                .or_else(|| redis_url.clone()),
            redis_url,
            redis_tls: RedisTls {
                ca_file: v.redis_ca_file,
                cert_file: v.redis_cert_file,
                key_file: v.redis_key_file,
            },
            key_prefix: v.key_prefix,
            store_timeout: ms(v.store_timeout_ms),
            redis_probe_interval: ms(v.redis_probe_interval_ms),
            redis_probe_max: ms(v.redis_probe_max_ms),
            api_token: v.api_token.filter(|t| !t.is_empty()),
            api_token_file: v.api_token_file.filter(|p| !p.as_os_str().is_empty()),
            allow_unauthenticated: v.allow_unauthenticated,
            instance_id: v.instance_id,
            workers: v.workers,
            blocking_threads: v.blocking_threads,
            session_ttl_secs: v.session_ttl_secs,
            session_max_lifetime_secs: v.session_max_lifetime_secs,
            max_metadata_bytes: v.max_metadata_bytes,
            max_body_bytes: v.max_body_bytes,
            cookie_secure: v.cookie_secure,
            trusted_proxies: v.trusted_proxies,
            max_connections: v.max_connections,
            max_in_flight: v.max_in_flight,
            rate_limit_per_ip: v.rate_limit_per_ip,
            // Defaults that follow another key.
            rate_limit_burst: v
                .rate_limit_burst
                .unwrap_or(v.rate_limit_per_ip.saturating_mul(2)),
            cookie_max_age_secs: v.cookie_max_age_secs.unwrap_or(v.session_ttl_secs),
            cache_capacity_bytes: mb(sled_cache_mb),
            max_journal_bytes: mb(v.max_journal_mb),
            min_free_bytes: mb(v.min_free_mb),
            disk_flush_timeout: ms(v.disk_flush_timeout_ms),
            replay_batch: v.replay_batch,
            near_cache_bytes: mb(v.near_cache_mb),
            touch_flush: ms(v.touch_flush_ms),
            near_admit: ms(v.near_admit_ms),
            mirror_lag_secs: v.mirror_lag_secs.unwrap_or(v.session_ttl_secs / 10),
            max_sessions_per_user: v.max_sessions_per_user,
            max_sessions: v.max_sessions,
            create_rate_per_ip: v.create_rate_per_ip,
            require_redis: v.require_redis,
            header_timeout: ms(v.header_timeout_ms),
            request_timeout: ms(v.request_timeout_ms),
            shutdown_grace: ms(v.shutdown_grace_ms),
            drain_delay: ms(v.drain_delay_ms),
            cache_ttl_secs: v.cache_ttl_secs,
            max_cache_value_bytes: v.max_cache_value_bytes,
            cache_memory_bytes: mb(v.cache_memory_mb),
            cache_disk_bytes: mb(v.cache_disk_mb),
            cache_lease_wait: ms(v.cache_lease_wait_ms),
            cache_lease_ttl: ms(v.cache_lease_ttl_ms),
            log_format: v.log_format,
            log_level: v.log_level,
            access_log: v.access_log,
            access_log_sample: v.access_log_sample,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if self.redis_tls.cert_file.is_some() != self.redis_tls.key_file.is_some() {
            return bad("redis_cert_file and redis_key_file go together");
        }
        if self.replay_batch == 0 {
            return bad("replay_batch must be at least 1");
        }
        if self.touch_flush.is_zero() || self.touch_flush > Duration::from_secs(10) {
            return bad("touch_flush_ms must be between 1 and 10000");
        }
        if self.workers == 0 || self.blocking_threads == 0 {
            return bad("workers and blocking_threads must be at least 1");
        }
        if self.session_ttl_secs == 0 || self.session_max_lifetime_secs == 0 {
            return bad("session_ttl_secs and session_max_lifetime_secs must be at least 1");
        }
        // A thousand years: every stored time stays far inside RFC 3339.
        const MAX_LIFETIME_SECS: u64 = 1_000 * 365 * 86_400;
        if self.session_ttl_secs > MAX_LIFETIME_SECS
            || self.session_max_lifetime_secs > MAX_LIFETIME_SECS
        {
            return bad(
                "session_ttl_secs and session_max_lifetime_secs must be at most 1000 years",
            );
        }
        if self.max_connections == 0 || self.max_in_flight == 0 {
            return bad("max_connections and max_in_flight must be at least 1");
        }
        if self.rate_limit_per_ip > 0 && self.rate_limit_burst == 0 {
            return bad("rate_limit_burst must be at least 1 when rate_limit_per_ip is set");
        }
        if self.store_timeout.is_zero() {
            return bad("store_timeout_ms must be at least 1");
        }
        if self.mirror_lag_secs > self.session_ttl_secs / 10 {
            return bad("mirror_lag_secs must be at most a tenth of session_ttl_secs");
        }
        if self.disk_flush_timeout.is_zero() {
            return bad("disk_flush_timeout_ms must be at least 1");
        }
        if self.key_prefix.is_empty() || self.key_prefix.len() > 64 {
            return bad("key_prefix must be 1-64 characters");
        }
        if self.cache_ttl_secs == 0 || self.cache_ttl_secs > MAX_CACHE_TTL_SECS {
            return bad("cache_ttl_secs must be 1 to 2592000 (30 days)");
        }
        if self.max_cache_value_bytes == 0 || self.max_cache_value_bytes > 64 * 1024 * 1024 {
            return bad("max_cache_value_bytes must be 1 to 67108864 (64 MiB)");
        }
        if self.access_log_sample == 0 {
            return bad("access_log_sample must be at least 1");
        }
        if self.cache_lease_ttl.is_zero() {
            return bad("cache_lease_ttl_ms must be at least 1");
        }
        Ok(())
    }

    /// The rule that keeps an unauthenticated node off the LAN by accident.
    /// `tokens` counts every accepted token (`api_token` and those of
    /// `api_token_file`, as read at start).
    pub fn check_exposure(&self, addr: SocketAddr, tokens: usize) -> Result<(), ConfigError> {
        if tokens == 0 && !addr.ip().is_loopback() && !self.allow_unauthenticated {
            return Err(ConfigError::Invalid(format!(
                "refusing to listen on non-loopback {addr} without api_token; set one \
                 (EDGENODE_API_TOKEN or api_token_file) or pass --allow-unauthenticated"
            )));
        }
        Ok(())
    }

    /// Whether `ip` is a configured trusted proxy; an IPv4 peer seen on a
    /// dual-stack socket (`::ffff:a.b.c.d`) counts as its IPv4 address.
    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted_proxies.iter().any(|n| n.contains(&ip))
    }
}

fn read_file(path: &Path) -> Result<Args, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.into(),
        source,
    })
}

impl Args {
    /// These values over `file`'s: each key given here wins, the file's
    /// fills the rest. Done through the keys' serialised form, so no key is
    /// listed a second time.
    fn over(self, file: Args) -> Result<Args, ConfigError> {
        let invalid = |e: serde_json::Error| ConfigError::Invalid(e.to_string());
        let mut merged = serde_json::to_value(file).map_err(invalid)?;
        if let (Some(base), serde_json::Value::Object(given)) = (
            merged.as_object_mut(),
            serde_json::to_value(&self).map_err(invalid)?,
        ) {
            for (key, value) in given {
                if !value.is_null() {
                    base.insert(key, value);
                }
            }
        }
        let mut out: Args = serde_json::from_value(merged).map_err(invalid)?;
        out.config = self.config;
        Ok(out)
    }
}

/// `trusted_proxies` in the file: strings, each an IP or a CIDR.
mod nets {
    use ipnet::IpNet;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<IpNet>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(list) => s.collect_seq(list.iter().map(|n| n.to_string())),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<IpNet>>, D::Error> {
        let Some(list) = Option::<Vec<String>>::deserialize(d)? else {
            return Ok(None);
        };
        list.iter()
            .map(|s| super::parse_net(s).map_err(serde::de::Error::custom))
            .collect::<Result<_, _>>()
            .map(Some)
    }
}

/// `log_level` in the file: a level's name.
mod level {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<tracing::Level>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(l) => s.serialize_str(l.as_str()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<tracing::Level>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| {
                s.parse().map_err(|_| {
                    serde::de::Error::custom(format!(
                        "log_level {s:?} is not one of error, warn, info, debug, trace"
                    ))
                })
            })
            .transpose()
    }
}

/// An IP or a CIDR.
fn parse_net(s: &str) -> Result<IpNet, ConfigError> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| {
            ConfigError::Invalid(format!("trusted_proxies entry {s:?} is not an IP or CIDR"))
        })
}

fn parse_net_arg(s: &str) -> Result<IpNet, String> {
    parse_net(s).map_err(|e| e.to_string())
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// `$STATE_DIRECTORY` (set by systemd's StateDirectory=) or `./data`.
fn default_data_dir() -> PathBuf {
    std::env::var("STATE_DIRECTORY")
        .ok()
        .and_then(|v| {
            v.split(':')
                .next()
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from("./data"))
}

/// From gethostname(2), not /proc/sys: the hardened unit's ProcSubset=pid
/// hides /proc/sys.
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match (rc, std::str::from_utf8(&buf[..end])) {
        (0, Ok(name)) if !name.is_empty() => name.to_string(),
        _ => "edgenode".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::io::Write;

    #[test]
    fn flags_beat_file_which_beats_defaults() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "listen = \"127.0.0.1:9000\"\nworkers = 3\ntrusted_proxies = [\"10.0.0.0/8\", \"192.168.1.2\"]").unwrap();
        let args = Args::try_parse_from([
            "edgenode",
            "--config",
            f.path().to_str().unwrap(),
            "--workers",
            "5",
        ])
        .unwrap();
        let c = Config::resolve(args).unwrap();
        assert_eq!(c.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(c.workers, 5);
        assert_eq!(c.session_ttl_secs, 86_400);
        assert!(c.is_trusted_proxy("10.1.2.3".parse().unwrap()));
        assert!(c.is_trusted_proxy("192.168.1.2".parse().unwrap()));
        assert!(!c.is_trusted_proxy("192.168.1.3".parse().unwrap()));
    }

    #[test]
    fn every_kind_of_key_reads_from_the_file_and_a_flag_overrides_only_its_own() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            f,
            "log_level = \"debug\"\nlog_format = \"json\"\nrequire_redis = true\n\
             redis_url = \"redis://127.0.0.1:1/\"\ncookie_max_age_secs = 0"
        )
        .unwrap();
        let path = f.path().to_str().unwrap();
        let c =
            Config::resolve(Args::try_parse_from(["edgenode", "--config", path]).unwrap()).unwrap();
        assert_eq!(c.log_level, tracing::Level::DEBUG);
        assert_eq!(c.log_format, LogFormat::Json);
        assert!(c.require_redis);
        assert_eq!(c.redis_url.as_deref(), Some("redis://127.0.0.1:1/"));
        assert_eq!(c.cookie_max_age_secs, 0);
        let c = Config::resolve(
            Args::try_parse_from(["edgenode", "--config", path, "--log-level", "warn"]).unwrap(),
        )
        .unwrap();
        assert_eq!(c.log_level, tracing::Level::WARN);
        assert!(c.require_redis, "the file still fills the rest");
        let mut bad = tempfile::NamedTempFile::new().unwrap();
        writeln!(bad, "log_level = \"chatty\"").unwrap();
        let args = Args::try_parse_from(["edgenode", "--config", bad.path().to_str().unwrap()]);
        assert!(Config::resolve(args.unwrap()).is_err());
    }

    #[test]
    fn the_shipped_example_config_names_only_real_keys() {
        // Uncomment every `#key = value` line of the example and load it.
        let example = include_str!("../../deploy/edgenode.toml.example");
        let active: String = example
            .lines()
            .filter_map(|l| l.strip_prefix('#'))
            .filter(|l| {
                l.split_once(" = ")
                    .is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
            })
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(active.lines().count() >= 25, "{active}");
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(active.as_bytes()).unwrap();
        let args =
            Args::try_parse_from(["edgenode", "--config", f.path().to_str().unwrap()]).unwrap();
        let c = Config::resolve(args).unwrap_or_else(|e| panic!("{e}\n{active}"));
        assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.store_timeout, Duration::from_millis(250));
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "redis_ulr = \"redis://x\"").unwrap();
        let args =
            Args::try_parse_from(["edgenode", "--config", f.path().to_str().unwrap()]).unwrap();
        assert!(matches!(
            Config::resolve(args),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn non_loopback_needs_a_token_or_explicit_opt_out() {
        let args = Args::try_parse_from(["edgenode", "--config", "/dev/null"]).unwrap();
        let mut c = Config::resolve(args).unwrap();
        let lan: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        assert!(c.check_exposure(lan, 0).is_err());
        assert!(c
            .check_exposure("127.0.0.1:8080".parse().unwrap(), 0)
            .is_ok());
        assert!(c.check_exposure("[::1]:8080".parse().unwrap(), 0).is_ok());
        assert!(c.check_exposure("[::]:8080".parse().unwrap(), 0).is_err());
        c.allow_unauthenticated = true;
        assert!(c.check_exposure(lan, 0).is_ok());
        c.allow_unauthenticated = false;
        assert!(c.check_exposure(lan, 2).is_ok());
    }
}
