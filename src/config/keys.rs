//! Every configuration key, declared once: one entry of the [`keys!`] table
//! gives the key's flag (`--redis-url`), its file key (`redis_url`), its
//! environment name (`EDGENODE_REDIS_URL`, derived from the name at compile
//! time), its `--help` text and its default. From the table come [`Args`]
//! (clap reads the command line and environment, serde the file: unknown
//! keys are an error, so a typo does not silently fall back to a default)
//! and [`Values`], the keys with their defaults applied, which
//! `Config::resolve` turns into the units the node uses.
//!
//! An entry: `name: Type, "VALUE_NAME", "help" [, default = expr | , or expr];`
//! - `default = expr`: a fixed default, shown in `--help` as `[default: …]`;
//! - `or expr`: a default computed at start (the help text says what it is),
//!   or one not worth showing (`false`);
//! - neither: the key stays optional, or its default depends on another key
//!   (resolved in `Config::resolve`).

use super::{default_data_dir, hostname, level, nets, parse_net_arg, AccessLog, LogFormat};
use clap::Parser;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

/// Where the file is looked for when `--config` is not given.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/edgenode/edgenode.toml";

/// `EDGENODE_` + `name` in upper case, at compile time (clap needs a
/// `&'static str`).
const fn env_bytes<const N: usize>(name: &str) -> [u8; N] {
    const PREFIX: &[u8] = b"EDGENODE_";
    let mut out = [0u8; N];
    let mut i = 0;
    while i < PREFIX.len() {
        out[i] = PREFIX[i];
        i += 1;
    }
    let name = name.as_bytes();
    let mut j = 0;
    while j < name.len() {
        out[PREFIX.len() + j] = name[j].to_ascii_uppercase();
        j += 1;
    }
    out
}

macro_rules! env_name {
    ($name:ident) => {{
        const NAME: &str = stringify!($name);
        const BYTES: [u8; 9 + NAME.len()] = env_bytes(NAME);
        const ENV: &str = match std::str::from_utf8(&BYTES) {
            Ok(s) => s,
            Err(_) => panic!("a key name is ASCII"),
        };
        ENV
    }};
}

/// A default as `--help` shows it.
trait Shown {
    fn shown(&self) -> String;
}

macro_rules! shown_by_display {
    ($($t:ty),*) => {$(
        impl Shown for $t {
            fn shown(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
shown_by_display!(u32, u64, usize, bool, String, SocketAddr);

impl Shown for tracing::Level {
    /// As the key takes it (`info`), not as tracing prints it (`INFO`).
    fn shown(&self) -> String {
        self.as_str().to_ascii_lowercase()
    }
}

impl Shown for AccessLog {
    fn shown(&self) -> String {
        self.as_str().into()
    }
}

impl Shown for LogFormat {
    fn shown(&self) -> String {
        match self {
            LogFormat::Plain => "plain".into(),
            LogFormat::Json => "json".into(),
        }
    }
}

macro_rules! help_text {
    ($t:ty, $help:literal) => {
        $help
    };
    ($t:ty, $help:literal, $default:expr) => {
        format!("{} [default: {}]", $help, <$t as Shown>::shown(&$default))
    };
}

macro_rules! value_type {
    ($t:ty) => { Option<$t> };
    ($t:ty, $default:expr) => { $t };
}

macro_rules! value_of {
    ($given:expr) => {
        $given
    };
    ($given:expr, $default:expr) => {
        $given.unwrap_or_else(|| $default)
    };
}

macro_rules! keys {
    ($(
        $(#[$attr:meta])*
        $name:ident: $ty:ty, $value_name:literal, $help:literal
            $(, default = $shown:expr)? $(, or $quiet:expr)?;
    )*) => {
        /// Every key as given on the command line, in the environment or in
        /// the file. Every value is optional so that "not given" can fall
        /// through to the file and then the defaults.
        #[derive(Debug, Parser, Default, Serialize, Deserialize)]
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
            #[arg(long, env = env_name!(config), value_name = "FILE")]
            #[arg(help = "TOML configuration file [default: /etc/edgenode/edgenode.toml if it exists]")]
            #[serde(skip)]
            pub config: Option<PathBuf>,
            $(
                $(#[$attr])*
                #[arg(long, env = env_name!($name), value_name = $value_name)]
                #[arg(help = help_text!($ty, $help $(, $shown)?))]
                pub $name: Option<$ty>,
            )*
        }

        /// Every key with its default applied (when it has one of its own).
        pub struct Values {
            $(pub $name: value_type!($ty $(, $shown)? $(, $quiet)?),)*
        }

        impl Args {
            /// The keys given, defaults filling the rest.
            pub fn values(self) -> Values {
                Values {
                    $($name: value_of!(self.$name $(, $shown)? $(, $quiet)?),)*
                }
            }
        }
    };
}

/// The processor's cores: the default number of request workers.
fn available_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

keys! {
    listen: SocketAddr, "ADDR",
        "Address to listen on (ignored under systemd socket activation)", default = SocketAddr::from(([127, 0, 0, 1], 8080));
    data_dir: PathBuf, "DIR",
        "Directory of the sled database [default: $STATE_DIRECTORY under systemd, else ./data]", or default_data_dir();
    #[arg(hide_env_values = true)]
    redis_url: String, "URL",
        "Redis URL (redis://[:password@]host:port/db, or redis+sentinel://host:port[,host:port]/master_name[/db]); unset: sled only";
    key_prefix: String, "PREFIX",
        "Prefix of every Redis key", default = String::from("edgenode:");
    store_timeout_ms: u64, "MS",
        "Longest any request waits on Redis before the node falls back to sled", default = 250;
    redis_probe_interval_ms: u64, "MS",
        "First delay between probes of an unreachable Redis; doubles up to the maximum", default = 200;
    redis_probe_max_ms: u64, "MS",
        "Longest delay between probes of an unreachable Redis", default = 2000;
    #[arg(hide_env_values = true)]
    api_token: String, "TOKEN",
        "Bearer token required on /api/sessions*, /api/users*, /api/cache* and /metrics";
    api_token_file: PathBuf, "FILE",
        "File of accepted bearer tokens, one a line (# comments, blank lines ignored), accepted as well as api_token; re-read on SIGHUP (systemctl reload), so tokens rotate without a restart";
    #[arg(num_args = 0..=1, default_missing_value = "true")]
    allow_unauthenticated: bool, "BOOL",
        "Allow listening on a non-loopback address without an api token", or false;
    instance_id: String, "NAME",
        "Name of this node in health, metrics and logs [default: the hostname]", or hostname();
    workers: usize, "N",
        "Request worker threads [default: the available cores]", or available_cores();
    blocking_threads: usize, "N",
        "Threads for blocking disk work (fsync)", default = 2;
    session_ttl_secs: u64, "SECS",
        "Idle lifetime of a session; every request that uses it extends it", default = 86400;
    session_max_lifetime_secs: u64, "SECS",
        "Absolute lifetime of a session, whatever its activity", default = 604800;
    max_metadata_bytes: usize, "BYTES",
        "Largest accepted metadata, JSON-encoded", default = 16384;
    max_body_bytes: usize, "BYTES",
        "Largest accepted request body", default = 65536;
    #[arg(num_args = 0..=1, default_missing_value = "true")]
    cookie_secure: bool, "BOOL",
        "Mark the session cookie Secure (set when clients reach the balancer over HTTPS)", or false;
    #[arg(value_delimiter = ',', value_parser = parse_net_arg)]
    #[serde(default, with = "nets")]
    trusted_proxies: Vec<IpNet>, "CIDR",
        "Proxies (IPs or CIDRs, comma-separated) whose X-Forwarded-For is believed", or Vec::new();
    max_connections: usize, "N",
        "Open connections above which new ones get a 503 and are closed", default = 1024;
    max_in_flight: usize, "N",
        "Requests being served at once above which new ones get a 503", default = 256;
    rate_limit_per_ip: u32, "N",
        "Requests per second each client IP may make (X-Forwarded-For from a trusted proxy names the client); above it: 429. 0 = off", default = 0;
    rate_limit_burst: u32, "N",
        "Requests a client IP may make at once before the per-second rate applies [default: twice rate_limit_per_ip]";
    // sled counts its cache in the bytes its pages take on disk; cached, they
    // take about twice that in memory (1.85x measured on 100k sessions), so
    // the 2 MB default costs ~3.7 MB of RSS once warm. At 4 MB a node filled
    // with 100k sessions and holding 1 000 connections measured 34-35 MB
    // against the 32 MB target. With Redis, sled holds only the mirror
    // (read in an outage): 1 MB took ~1.5 MB off a node serving 100 000
    // spread sessions, at no measured cost in req/s (docs/performance.md).
    cache_capacity_mb: u64, "MB",
        "sled page cache size, counted as on disk (in memory it takes about twice that) [default: 2; 1 with redis_url, where sled holds only the mirror]";
    max_journal_mb: u64, "MB",
        "Size of the outage journal above which creates, changes and rotations made during a Redis outage are refused (507); logouts never are, and touches stop being counted", default = 64;
    min_free_mb: u64, "MB",
        "Free space kept on the data directory's file system: below it writes are refused (507) and the node reports itself degraded and unready; logouts may use half of it", default = 64;
    // A slow but working SD card finishes a flush well within it.
    disk_flush_timeout_ms: u64, "MS",
        "Longest wait for a flush of the local store to disk: a flush still running past it is a disk fault (writes 503 at once, degraded, unready) until it returns", default = 5000;
    max_sessions_per_user: u64, "N",
        "Sessions one user may hold; creating one more deletes the oldest", default = 64;
    max_sessions: u64, "N",
        "Stored sessions (all users, the cluster's count in Redis mode) above which new sessions are refused with 503, before Redis runs out of memory", default = 500000;
    create_rate_per_ip: u32, "N",
        "New sessions per second that GET /api/session may create for one client address (an IPv6 client by its /64), with bursts of three times that; above it: 429. 0 = no limit", default = 10;
    #[arg(num_args = 0..=1, default_missing_value = "true")]
    require_redis: bool, "BOOL",
        "Unready (503 on /api/ready, so balancers send traffic elsewhere) whenever the node is not serving from Redis (Redis unreachable, or refusing the node's credentials); requests that still arrive are served from the local store", default = false;
    cookie_max_age_secs: u64, "SECS",
        "Max-Age of the session cookie; 0 makes it a browser-session cookie [default: session_ttl_secs]";
    // 3 MB: about 11 000 sessions used again within `near_admit_ms`, so a
    // node serving 10 000 sessions holds them all. 4 MB full cost a node
    // serving 100 000 spread sessions ~1 MB more RSS (over the 32 MB bound)
    // for fewer than one hit per copy; 8 MB 6.8 MB more (docs/performance.md).
    near_cache_mb: u64, "MB",
        "Memory for the near cache: in Redis mode, the sessions this node serves are kept here, coherent with Redis (CLIENT TRACKING), so a touch costs no Redis round trip. 0 = off", default = 3;
    touch_flush_ms: u64, "MS",
        "How often touches answered from the near cache are written to Redis (request counts, last access, sliding expiry): each session's count once per interval, one call per 64 sessions. A node killed with SIGKILL loses at most this much of its counts", default = 100;
    near_admit_ms: u64, "MS",
        "A session the near cache does not hold is cached only when used again within this long; its other uses are read through (one plain read, not cached) and counted with the write-behind. Spares Redis and the node the cost of caching sessions used once in a while (a LAN of browsers). 0 = cache every session used", default = 1000;
    mirror_lag_secs: u64, "SECS",
        "How far (in seconds) the disk mirror's copy of a session this node serves may lag the expiry Redis gives it before a use rewrites the copy; its count there lags by the uses of that long. Larger writes the SD card less; 0 rewrites it on every use. At most a tenth of session_ttl_secs [default: a tenth of session_ttl_secs]";
    replay_batch: usize, "N",
        "Journal entries sent to Redis in one pipelined round trip when replaying after an outage", default = 256;
    header_timeout_ms: u64, "MS",
        "Time a client has to send a request's headers; also how long an idle keep-alive connection is kept open (hyper runs one timer for both)", default = 10000;
    request_timeout_ms: u64, "MS",
        "Time a request may take, body included, before it is answered 503", default = 10000;
    shutdown_grace_ms: u64, "MS",
        "On SIGTERM, time in-flight requests get to finish", default = 10000;
    drain_delay_ms: u64, "MS",
        "On SIGTERM, time /api/ready answers 503 before the listener closes, so balancers stop sending first; set it above the balancer's check interval", default = 0;
    #[arg(hide_env_values = true)]
    cache_redis_url: String, "URL",
        "Redis of the shared cache (/api/cache), same forms as redis_url; a separate instance keeps cache memory from ever evicting sessions [default: redis_url]";
    // TLS to Redis (rediss://, rediss+sentinel://), for redis_url and
    // cache_redis_url alike.
    redis_ca_file: PathBuf, "FILE",
        "PEM file of the CA(s) that signed Redis's (and Sentinel's) TLS certificates, for rediss:// URLs [default: the system's CA bundle]";
    redis_cert_file: PathBuf, "FILE",
        "PEM client certificate presented to Redis over TLS (for Redis's default tls-auth-clients yes); needs redis_key_file";
    redis_key_file: PathBuf, "FILE",
        "PEM private key of redis_cert_file";
    cache_ttl_secs: u64, "SECS",
        "Lifetime of a cache value stored without ?ttl= or Cache-Control: max-age (at most 30 days)", default = 300;
    max_cache_value_bytes: usize, "BYTES",
        "Largest cache value accepted (413 above)", default = 512 * 1024;
    cache_memory_mb: u64, "MB",
        "Bytes of this node's in-memory cache tier (values, keys and bookkeeping); 0 = no memory tier", default = 8;
    cache_disk_mb: u64, "MB",
        "Bytes of this node's on-disk cache tier (sled), served while the cache's Redis is unreachable; the oldest values go first; 0 = none", default = 32;
    cache_lease_wait_ms: u64, "MS",
        "How long a GET ?lease=1 waits for another client's fill before it gets 404 without a lease", default = 1000;
    cache_lease_ttl_ms: u64, "MS",
        "Lifetime of a fill lease: a PUT carrying it later gets 409", default = 10000;
    log_format: LogFormat, "FORMAT",
        "Log format: plain or json", default = LogFormat::Plain;
    #[serde(default, with = "level")]
    log_level: tracing::Level, "LEVEL",
        "Log level: error, warn, info, debug, trace", default = tracing::Level::INFO;
    access_log: AccessLog, "MODE",
        "One INFO line per request (method, route template, status, duration, bytes, client, request id; never a session id): off, sampled (1 in access_log_sample) or full", default = AccessLog::Off;
    access_log_sample: u32, "N",
        "With access_log = sampled, one request in this many is logged", default = 100;
}
