//! Configuration: built-in defaults < TOML file < `EDGENODE_*` environment <
//! command-line flags.
//!
//! Every key has the same name in all three forms: TOML `redis_url`, env
//! `EDGENODE_REDIS_URL`, flag `--redis-url`, and is declared once, in [`Args`]
//! (clap reads the command line and environment, serde the file). clap
//! resolves flag-over-env for us; the file fills what neither set
//! ([`Args::over`]), then [`Config::resolve`] fills the rest with defaults
//! and turns units (ms, MB) into the types the node uses.

use clap::Parser;
use ipnet::IpNet;
use serde::Deserialize;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

const DEFAULT_CONFIG_FILE: &str = "/etc/edgenode/edgenode.toml";

// The defaults with a fixed value, each written once: `--help` shows them
// (`with_default`) and `Config::resolve` applies them.
const DEFAULT_STORE_TIMEOUT_MS: u64 = 250;
const DEFAULT_REDIS_PROBE_INTERVAL_MS: u64 = 200;
const DEFAULT_REDIS_PROBE_MAX_MS: u64 = 2000;
const DEFAULT_BLOCKING_THREADS: usize = 2;
const DEFAULT_SESSION_TTL_SECS: u64 = 86400;
const DEFAULT_SESSION_MAX_LIFETIME_SECS: u64 = 604800;
const DEFAULT_MAX_METADATA_BYTES: usize = 16384;
const DEFAULT_MAX_BODY_BYTES: usize = 65536;
const DEFAULT_MAX_CONNECTIONS: usize = 1024;
const DEFAULT_MAX_IN_FLIGHT: usize = 256;
const DEFAULT_RATE_LIMIT_PER_IP: u32 = 0;
/// sled counts its cache in the bytes its pages take on disk; cached, they take
/// about twice that in memory (1.85x measured on 100k sessions), so the 2 MB
/// default costs ~3.7 MB of RSS once warm. At 4 MB a node filled with 100k
/// sessions and holding 1 000 connections measured 34-35 MB against the
/// 32 MB target (docs/performance.md).
const DEFAULT_CACHE_CAPACITY_MB: u64 = 2;
const DEFAULT_MAX_JOURNAL_MB: u64 = 64;
const DEFAULT_MIN_FREE_MB: u64 = 64;
const DEFAULT_MAX_SESSIONS_PER_USER: u64 = 64;
const DEFAULT_MAX_SESSIONS: u64 = 500000;
const DEFAULT_CREATE_RATE_PER_IP: u32 = 10;
const DEFAULT_REQUIRE_REDIS: bool = false;
const DEFAULT_REPLAY_BATCH: usize = 256;
const DEFAULT_NEAR_CACHE_MB: u64 = 8;
const DEFAULT_NEAR_ADMIT_MS: u64 = 1_000;
const DEFAULT_TOUCH_FLUSH_MS: u64 = 100;
const DEFAULT_HEADER_TIMEOUT_MS: u64 = 10000;
const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 10000;
const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 10000;
const DEFAULT_DRAIN_DELAY_MS: u64 = 0;
const DEFAULT_CACHE_TTL_SECS: u64 = 300;
const DEFAULT_MAX_CACHE_VALUE_BYTES: usize = 512 * 1024;
const DEFAULT_CACHE_MEMORY_MB: u64 = 8;
const DEFAULT_CACHE_DISK_MB: u64 = 32;
const DEFAULT_CACHE_LEASE_WAIT_MS: u64 = 1000;
const DEFAULT_CACHE_LEASE_TTL_MS: u64 = 10000;
/// The longest TTL a cache value may have (30 days): every cache key in
/// Redis expires, and a namespace's generation key outlives its values by
/// being refreshed to this on every write.
pub const MAX_CACHE_TTL_SECS: u64 = 30 * 86_400;

const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
const DEFAULT_KEY_PREFIX: &str = "edgenode:";
const DEFAULT_LOG_FORMAT: &str = "plain";
const DEFAULT_LOG_LEVEL: &str = "info";

/// A key's help text with its default, as `--help` shows it.
fn with_default(text: &str, default: impl std::fmt::Display) -> String {
    format!("{text} [default: {default}]")
}

/// Every key, declared once: the command line and environment (clap), and
/// the TOML file (serde, same names; unknown keys are an error so a typo does
/// not silently fall back to a default). Every value is optional so that "not
/// given" can fall through to the file and then the defaults.
#[derive(Debug, Parser, Default, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[command(
    name = "edgenode",
    version = crate::VERSION_LINE,
    about = "Session server for Raspberry Pi clusters: sessions in Redis when it is reachable, \
             on the local disk (sled) when it is not, reconciled when it returns.",
    after_help = "Every option can also be set in the TOML file (same name with underscores, e.g. \
                  redis_url) or in the environment (EDGENODE_ + upper case, e.g. EDGENODE_REDIS_URL). \
                  Precedence: flags > environment > file > defaults."
)]
pub struct Args {
    /// TOML configuration file [default: /etc/edgenode/edgenode.toml if it exists]
    #[arg(long, env = "EDGENODE_CONFIG", value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    #[arg(help = with_default("Address to listen on (ignored under systemd socket activation)", DEFAULT_LISTEN))]
    #[arg(long, env = "EDGENODE_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// Directory of the sled database [default: $STATE_DIRECTORY under systemd, else ./data]
    #[arg(long, env = "EDGENODE_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Redis URL (redis://[:password@]host:port/db, or redis+sentinel://host:port[,host:port]/master_name[/db]); unset: sled only
    #[arg(
        long,
        env = "EDGENODE_REDIS_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub redis_url: Option<String>,

    #[arg(help = with_default("Prefix of every Redis key", DEFAULT_KEY_PREFIX))]
    #[arg(long, env = "EDGENODE_KEY_PREFIX", value_name = "PREFIX")]
    pub key_prefix: Option<String>,

    #[arg(long, env = "EDGENODE_STORE_TIMEOUT_MS", value_name = "MS")]
    #[arg(help = with_default("Longest any request waits on Redis before the node falls back to sled", DEFAULT_STORE_TIMEOUT_MS))]
    pub store_timeout_ms: Option<u64>,

    #[arg(long, env = "EDGENODE_REDIS_PROBE_INTERVAL_MS", value_name = "MS")]
    #[arg(help = with_default("First delay between probes of an unreachable Redis; doubles up to the maximum", DEFAULT_REDIS_PROBE_INTERVAL_MS))]
    pub redis_probe_interval_ms: Option<u64>,

    #[arg(long, env = "EDGENODE_REDIS_PROBE_MAX_MS", value_name = "MS")]
    #[arg(help = with_default("Longest delay between probes of an unreachable Redis", DEFAULT_REDIS_PROBE_MAX_MS))]
    pub redis_probe_max_ms: Option<u64>,

    /// Bearer token required on /api/sessions*, /api/users* and /metrics
    #[arg(
        long,
        env = "EDGENODE_API_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub api_token: Option<String>,

    /// Allow listening on a non-loopback address without an api token
    #[arg(long, env = "EDGENODE_ALLOW_UNAUTHENTICATED", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub allow_unauthenticated: Option<bool>,

    /// Name of this node in health, metrics and logs [default: the hostname]
    #[arg(long, env = "EDGENODE_INSTANCE_ID", value_name = "NAME")]
    pub instance_id: Option<String>,

    /// Request worker threads [default: the available cores]
    #[arg(long, env = "EDGENODE_WORKERS", value_name = "N")]
    pub workers: Option<usize>,

    #[arg(long, env = "EDGENODE_BLOCKING_THREADS", value_name = "N")]
    #[arg(help = with_default("Threads for blocking disk work (fsync)", DEFAULT_BLOCKING_THREADS))]
    pub blocking_threads: Option<usize>,

    #[arg(long, env = "EDGENODE_SESSION_TTL_SECS", value_name = "SECS")]
    #[arg(help = with_default("Idle lifetime of a session; every request that uses it extends it", DEFAULT_SESSION_TTL_SECS))]
    pub session_ttl_secs: Option<u64>,

    #[arg(long, env = "EDGENODE_SESSION_MAX_LIFETIME_SECS", value_name = "SECS")]
    #[arg(help = with_default("Absolute lifetime of a session, whatever its activity", DEFAULT_SESSION_MAX_LIFETIME_SECS))]
    pub session_max_lifetime_secs: Option<u64>,

    #[arg(long, env = "EDGENODE_MAX_METADATA_BYTES", value_name = "BYTES")]
    #[arg(help = with_default("Largest accepted metadata, JSON-encoded", DEFAULT_MAX_METADATA_BYTES))]
    pub max_metadata_bytes: Option<usize>,

    #[arg(long, env = "EDGENODE_MAX_BODY_BYTES", value_name = "BYTES")]
    #[arg(help = with_default("Largest accepted request body", DEFAULT_MAX_BODY_BYTES))]
    pub max_body_bytes: Option<usize>,

    /// Mark the session cookie Secure (set when clients reach the balancer over HTTPS)
    #[arg(long, env = "EDGENODE_COOKIE_SECURE", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub cookie_secure: Option<bool>,

    /// Proxies (IPs or CIDRs, comma-separated) whose X-Forwarded-For is believed
    #[arg(long, env = "EDGENODE_TRUSTED_PROXIES", value_delimiter = ',', value_name = "CIDR", value_parser = parse_net_arg)]
    #[serde(default, with = "nets")]
    pub trusted_proxies: Option<Vec<IpNet>>,

    #[arg(long, env = "EDGENODE_MAX_CONNECTIONS", value_name = "N")]
    #[arg(help = with_default("Open connections above which new ones get a 503 and are closed", DEFAULT_MAX_CONNECTIONS))]
    pub max_connections: Option<usize>,

    #[arg(long, env = "EDGENODE_MAX_IN_FLIGHT", value_name = "N")]
    #[arg(help = with_default("Requests being served at once above which new ones get a 503", DEFAULT_MAX_IN_FLIGHT))]
    pub max_in_flight: Option<usize>,

    #[arg(long, env = "EDGENODE_RATE_LIMIT_PER_IP", value_name = "N")]
    #[arg(help = with_default("Requests per second each client IP may make (X-Forwarded-For from a trusted proxy names the client); above it: 429. 0 = off", DEFAULT_RATE_LIMIT_PER_IP))]
    pub rate_limit_per_ip: Option<u32>,

    /// Requests a client IP may make at once before the per-second rate
    /// applies [default: twice rate_limit_per_ip]
    #[arg(long, env = "EDGENODE_RATE_LIMIT_BURST", value_name = "N")]
    pub rate_limit_burst: Option<u32>,

    #[arg(long, env = "EDGENODE_CACHE_CAPACITY_MB", value_name = "MB")]
    #[arg(help = with_default("sled page cache size, counted as on disk (in memory it takes about twice that)", DEFAULT_CACHE_CAPACITY_MB))]
    pub cache_capacity_mb: Option<u64>,

    #[arg(long, env = "EDGENODE_MAX_JOURNAL_MB", value_name = "MB")]
    #[arg(help = with_default("Size of the outage journal above which creates, changes and rotations made during a Redis outage are refused (507); logouts never are, and touches stop being counted", DEFAULT_MAX_JOURNAL_MB))]
    pub max_journal_mb: Option<u64>,

    #[arg(long, env = "EDGENODE_MIN_FREE_MB", value_name = "MB")]
    #[arg(help = with_default("Free space kept on the data directory's file system: below it writes are refused (507) and the node reports itself degraded and unready; logouts may use half of it", DEFAULT_MIN_FREE_MB))]
    pub min_free_mb: Option<u64>,

    #[arg(long, env = "EDGENODE_MAX_SESSIONS_PER_USER", value_name = "N")]
    #[arg(help = with_default("Sessions one user may hold; creating one more deletes the oldest", DEFAULT_MAX_SESSIONS_PER_USER))]
    pub max_sessions_per_user: Option<u64>,

    #[arg(long, env = "EDGENODE_MAX_SESSIONS", value_name = "N")]
    #[arg(help = with_default("Stored sessions (all users, the cluster's count in Redis mode) above which new sessions are refused with 503, before Redis runs out of memory", DEFAULT_MAX_SESSIONS))]
    pub max_sessions: Option<u64>,

    #[arg(long, env = "EDGENODE_CREATE_RATE_PER_IP", value_name = "N")]
    #[arg(help = with_default("New sessions per second that GET /api/session may create for one client address (an IPv6 client by its /64), with bursts of three times that; above it: 429. 0 = no limit", DEFAULT_CREATE_RATE_PER_IP))]
    pub create_rate_per_ip: Option<u32>,

    #[arg(long, env = "EDGENODE_REQUIRE_REDIS", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    #[arg(help = with_default("Unready (503 on /api/ready, so balancers send traffic elsewhere) whenever the node is not serving from Redis (Redis unreachable, or refusing the node's credentials); requests that still arrive are served from the local store", DEFAULT_REQUIRE_REDIS))]
    pub require_redis: Option<bool>,

    /// Max-Age of the session cookie; 0 makes it a browser-session cookie
    /// [default: session_ttl_secs]
    #[arg(long, env = "EDGENODE_COOKIE_MAX_AGE_SECS", value_name = "SECS")]
    pub cookie_max_age_secs: Option<u64>,

    #[arg(long, env = "EDGENODE_NEAR_CACHE_MB", value_name = "MB")]
    #[arg(help = with_default("Memory for the near cache: in Redis mode, the sessions this node serves are kept here, coherent with Redis (CLIENT TRACKING), so a touch costs no Redis round trip. 0 = off", DEFAULT_NEAR_CACHE_MB))]
    pub near_cache_mb: Option<u64>,

    #[arg(long, env = "EDGENODE_NEAR_ADMIT_MS", value_name = "MS")]
    #[arg(help = with_default("A session the near cache does not hold is cached only when used again within this long; its other uses are counted in Redis at once. Spares Redis and the node the cost of caching sessions used once in a while (a LAN of browsers). 0 = cache every session used", DEFAULT_NEAR_ADMIT_MS))]
    pub near_admit_ms: Option<u64>,

    #[arg(long, env = "EDGENODE_TOUCH_FLUSH_MS", value_name = "MS")]
    #[arg(help = with_default("How often touches answered from the near cache are written to Redis (request counts, last access, sliding expiry): one command per session per interval. A node killed with SIGKILL loses at most this much of its counts", DEFAULT_TOUCH_FLUSH_MS))]
    pub touch_flush_ms: Option<u64>,

    /// How far (in seconds) the disk mirror's copy of a session this node
    /// serves may lag the expiry Redis gives it before a use rewrites the
    /// copy; its count there lags by the uses of that long. Larger writes
    /// the SD card less; 0 rewrites it on every use. At most a tenth of
    /// session_ttl_secs [default: a tenth of session_ttl_secs]
    #[arg(long, env = "EDGENODE_MIRROR_LAG_SECS", value_name = "SECS")]
    pub mirror_lag_secs: Option<u64>,

    #[arg(long, env = "EDGENODE_REPLAY_BATCH", value_name = "N")]
    #[arg(help = with_default("Journal entries sent to Redis in one pipelined round trip when replaying after an outage", DEFAULT_REPLAY_BATCH))]
    pub replay_batch: Option<usize>,

    #[arg(long, env = "EDGENODE_HEADER_TIMEOUT_MS", value_name = "MS")]
    #[arg(help = with_default("Time a client has to send a request's headers; also how long an idle keep-alive connection is kept open (hyper runs one timer for both)", DEFAULT_HEADER_TIMEOUT_MS))]
    pub header_timeout_ms: Option<u64>,

    #[arg(long, env = "EDGENODE_REQUEST_TIMEOUT_MS", value_name = "MS")]
    #[arg(help = with_default("Time a request may take, body included, before it is answered 503", DEFAULT_REQUEST_TIMEOUT_MS))]
    pub request_timeout_ms: Option<u64>,

    #[arg(long, env = "EDGENODE_SHUTDOWN_GRACE_MS", value_name = "MS")]
    #[arg(help = with_default("On SIGTERM, time in-flight requests get to finish", DEFAULT_SHUTDOWN_GRACE_MS))]
    pub shutdown_grace_ms: Option<u64>,

    #[arg(long, env = "EDGENODE_DRAIN_DELAY_MS", value_name = "MS")]
    #[arg(help = with_default("On SIGTERM, time /api/ready answers 503 before the listener closes, so balancers stop sending first; set it above the balancer's check interval", DEFAULT_DRAIN_DELAY_MS))]
    pub drain_delay_ms: Option<u64>,

    /// Redis of the shared cache (/api/cache), same forms as redis_url; a
    /// separate instance keeps cache memory from ever evicting sessions
    /// [default: redis_url]
    #[arg(
        long,
        env = "EDGENODE_CACHE_REDIS_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub cache_redis_url: Option<String>,

    #[arg(long, env = "EDGENODE_CACHE_TTL_SECS", value_name = "SECS")]
    #[arg(help = with_default("Lifetime of a cache value stored without ?ttl= or Cache-Control: max-age (at most 30 days)", DEFAULT_CACHE_TTL_SECS))]
    pub cache_ttl_secs: Option<u64>,

    #[arg(long, env = "EDGENODE_MAX_CACHE_VALUE_BYTES", value_name = "BYTES")]
    #[arg(help = with_default("Largest cache value accepted (413 above)", DEFAULT_MAX_CACHE_VALUE_BYTES))]
    pub max_cache_value_bytes: Option<usize>,

    #[arg(long, env = "EDGENODE_CACHE_MEMORY_MB", value_name = "MB")]
    #[arg(help = with_default("Bytes of this node's in-memory cache tier (values, keys and bookkeeping); 0 = no memory tier", DEFAULT_CACHE_MEMORY_MB))]
    pub cache_memory_mb: Option<u64>,

    #[arg(long, env = "EDGENODE_CACHE_DISK_MB", value_name = "MB")]
    #[arg(help = with_default("Bytes of this node's on-disk cache tier (sled), served while the cache's Redis is unreachable; the oldest values go first; 0 = none", DEFAULT_CACHE_DISK_MB))]
    pub cache_disk_mb: Option<u64>,

    #[arg(long, env = "EDGENODE_CACHE_LEASE_WAIT_MS", value_name = "MS")]
    #[arg(help = with_default("How long a GET ?lease=1 waits for another client's fill before it gets 404 without a lease", DEFAULT_CACHE_LEASE_WAIT_MS))]
    pub cache_lease_wait_ms: Option<u64>,

    #[arg(long, env = "EDGENODE_CACHE_LEASE_TTL_MS", value_name = "MS")]
    #[arg(help = with_default("Lifetime of a fill lease: a PUT carrying it later gets 409", DEFAULT_CACHE_LEASE_TTL_MS))]
    pub cache_lease_ttl_ms: Option<u64>,

    #[arg(help = with_default("Log format: plain or json", DEFAULT_LOG_FORMAT))]
    #[arg(long, env = "EDGENODE_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    #[arg(help = with_default("Log level: error, warn, info, debug, trace", DEFAULT_LOG_LEVEL))]
    #[arg(long, env = "EDGENODE_LOG_LEVEL", value_name = "LEVEL")]
    #[serde(default, with = "level")]
    pub log_level: Option<tracing::Level>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Plain,
    Json,
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
    pub replay_batch: usize,
    pub near_cache_bytes: u64,
    pub near_admit: Duration,
    pub touch_flush: Duration,
    /// See `Args::mirror_lag_secs`.
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
    pub cache_ttl_secs: u64,
    pub max_cache_value_bytes: usize,
    pub cache_memory_bytes: u64,
    pub cache_disk_bytes: u64,
    pub cache_lease_wait: Duration,
    pub cache_lease_ttl: Duration,
    pub log_format: LogFormat,
    pub log_level: tracing::Level,
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
        let a = args.over(file)?;
        let rate_limit_per_ip = a.rate_limit_per_ip.unwrap_or(DEFAULT_RATE_LIMIT_PER_IP);
        let trusted_proxies = a.trusted_proxies.unwrap_or_default();
        let log_level = match a.log_level {
            Some(l) => l,
            None => DEFAULT_LOG_LEVEL
                .parse()
                .map_err(|_| ConfigError::Invalid("default log_level".into()))?,
        };
        let session_ttl_secs = a.session_ttl_secs.unwrap_or(DEFAULT_SESSION_TTL_SECS);
        let redis_url = a.redis_url.clone().filter(|u| !u.is_empty());
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let config = Config {
            listen: match a.listen {
                Some(l) => l,
                None => DEFAULT_LISTEN
                    .parse()
                    .map_err(|e| ConfigError::Invalid(format!("default listen: {e}")))?,
            },
            data_dir: a.data_dir.unwrap_or_else(default_data_dir),
            redis_url: redis_url.clone(),
            key_prefix: a.key_prefix.unwrap_or_else(|| DEFAULT_KEY_PREFIX.into()),
            store_timeout: ms(a.store_timeout_ms.unwrap_or(DEFAULT_STORE_TIMEOUT_MS)),
            redis_probe_interval: ms(a
                .redis_probe_interval_ms
                .unwrap_or(DEFAULT_REDIS_PROBE_INTERVAL_MS)),
            redis_probe_max: ms(a.redis_probe_max_ms.unwrap_or(DEFAULT_REDIS_PROBE_MAX_MS)),
            api_token: a.api_token.filter(|t| !t.is_empty()),
            allow_unauthenticated: a.allow_unauthenticated.unwrap_or(false),
            instance_id: a.instance_id.unwrap_or_else(hostname),
            workers: a.workers.unwrap_or(cores),
            blocking_threads: a.blocking_threads.unwrap_or(DEFAULT_BLOCKING_THREADS),
            session_ttl_secs,
            session_max_lifetime_secs: a
                .session_max_lifetime_secs
                .unwrap_or(DEFAULT_SESSION_MAX_LIFETIME_SECS),
            max_metadata_bytes: a.max_metadata_bytes.unwrap_or(DEFAULT_MAX_METADATA_BYTES),
            max_body_bytes: a.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES),
            cookie_secure: a.cookie_secure.unwrap_or(false),
            trusted_proxies,
            max_connections: a.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
            max_in_flight: a.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT),
            rate_limit_per_ip,
            rate_limit_burst: a
                .rate_limit_burst
                .unwrap_or(rate_limit_per_ip.saturating_mul(2)),
            cache_capacity_bytes: a.cache_capacity_mb.unwrap_or(DEFAULT_CACHE_CAPACITY_MB)
                * 1024
                * 1024,
            max_journal_bytes: a
                .max_journal_mb
                .unwrap_or(DEFAULT_MAX_JOURNAL_MB)
                .saturating_mul(1024 * 1024),
            min_free_bytes: a
                .min_free_mb
                .unwrap_or(DEFAULT_MIN_FREE_MB)
                .saturating_mul(1024 * 1024),
            replay_batch: a.replay_batch.unwrap_or(DEFAULT_REPLAY_BATCH),
            near_cache_bytes: a
                .near_cache_mb
                .unwrap_or(DEFAULT_NEAR_CACHE_MB)
                .saturating_mul(1024 * 1024),
            near_admit: ms(a.near_admit_ms.unwrap_or(DEFAULT_NEAR_ADMIT_MS)),
            touch_flush: ms(a.touch_flush_ms.unwrap_or(DEFAULT_TOUCH_FLUSH_MS)),
            mirror_lag_secs: a.mirror_lag_secs.unwrap_or(session_ttl_secs / 10),
            max_sessions_per_user: a
                .max_sessions_per_user
                .unwrap_or(DEFAULT_MAX_SESSIONS_PER_USER),
            max_sessions: a.max_sessions.unwrap_or(DEFAULT_MAX_SESSIONS),
            create_rate_per_ip: a.create_rate_per_ip.unwrap_or(DEFAULT_CREATE_RATE_PER_IP),
            require_redis: a.require_redis.unwrap_or(DEFAULT_REQUIRE_REDIS),
            cookie_max_age_secs: a.cookie_max_age_secs.unwrap_or(session_ttl_secs),
            header_timeout: ms(a.header_timeout_ms.unwrap_or(DEFAULT_HEADER_TIMEOUT_MS)),
            request_timeout: ms(a.request_timeout_ms.unwrap_or(DEFAULT_REQUEST_TIMEOUT_MS)),
            shutdown_grace: ms(a.shutdown_grace_ms.unwrap_or(DEFAULT_SHUTDOWN_GRACE_MS)),
            drain_delay: ms(a.drain_delay_ms.unwrap_or(DEFAULT_DRAIN_DELAY_MS)),
            cache_redis_url: a
                .cache_redis_url
                .filter(|u| !u.is_empty())
                .or_else(|| redis_url.clone()),
            cache_ttl_secs: a.cache_ttl_secs.unwrap_or(DEFAULT_CACHE_TTL_SECS),
            max_cache_value_bytes: a
                .max_cache_value_bytes
                .unwrap_or(DEFAULT_MAX_CACHE_VALUE_BYTES),
            cache_memory_bytes: a
                .cache_memory_mb
                .unwrap_or(DEFAULT_CACHE_MEMORY_MB)
                .saturating_mul(1024 * 1024),
            cache_disk_bytes: a
                .cache_disk_mb
                .unwrap_or(DEFAULT_CACHE_DISK_MB)
                .saturating_mul(1024 * 1024),
            cache_lease_wait: ms(a.cache_lease_wait_ms.unwrap_or(DEFAULT_CACHE_LEASE_WAIT_MS)),
            cache_lease_ttl: ms(a.cache_lease_ttl_ms.unwrap_or(DEFAULT_CACHE_LEASE_TTL_MS)),
            log_format: match a.log_format {
                Some(f) => f,
                None => <LogFormat as clap::ValueEnum>::from_str(DEFAULT_LOG_FORMAT, false)
                    .map_err(|e| ConfigError::Invalid(format!("default log_format: {e}")))?,
            },
            log_level,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if self.replay_batch == 0 {
            return bad("replay_batch must be at least 1");
        }
        if self.touch_flush.is_zero() || self.touch_flush > Duration::from_secs(10) {
            return bad("touch_flush_ms must be between 1 and 10000");
        }
        if self.mirror_lag_secs > self.session_ttl_secs / 10 {
            return bad("mirror_lag_secs must be at most a tenth of session_ttl_secs");
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
        if self.key_prefix.is_empty() || self.key_prefix.len() > 64 {
            return bad("key_prefix must be 1-64 characters");
        }
        if self.cache_ttl_secs == 0 || self.cache_ttl_secs > MAX_CACHE_TTL_SECS {
            return bad("cache_ttl_secs must be 1 to 2592000 (30 days)");
        }
        if self.max_cache_value_bytes == 0 || self.max_cache_value_bytes > 64 * 1024 * 1024 {
            return bad("max_cache_value_bytes must be 1 to 67108864 (64 MiB)");
        }
        if self.cache_lease_ttl.is_zero() {
            return bad("cache_lease_ttl_ms must be at least 1");
        }
        Ok(())
    }

    /// The rule that keeps an unauthenticated node off the LAN by accident.
    pub fn check_exposure(&self, addr: SocketAddr) -> Result<(), ConfigError> {
        if self.api_token.is_none() && !addr.ip().is_loopback() && !self.allow_unauthenticated {
            return Err(ConfigError::Invalid(format!(
                "refusing to listen on non-loopback {addr} without api_token; set one \
                 (EDGENODE_API_TOKEN) or pass --allow-unauthenticated"
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
        let example = include_str!("../deploy/edgenode.toml.example");
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
        assert!(c.check_exposure(lan).is_err());
        assert!(c.check_exposure("127.0.0.1:8080".parse().unwrap()).is_ok());
        c.allow_unauthenticated = true;
        assert!(c.check_exposure(lan).is_ok());
        c.allow_unauthenticated = false;
        c.api_token = Some("t".into());
        assert!(c.check_exposure(lan).is_ok());
    }
}
