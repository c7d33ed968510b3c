//! What each component takes, built from the resolved [`Config`] (as
//! ripgrep's `HiArgs` builds what its consumers need): `node.rs` only wires
//! the results together, and no component reads all of `Config`.

use super::{Config, MAX_CACHE_TTL_SECS};
use crate::admission::{Admission, RateLimiter};
use crate::session::Limits;
use crate::store::local::LocalLimits;
use crate::store::StoreLimits;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// TLS to Redis (`redis_ca_file`, `redis_cert_file`, `redis_key_file`),
/// used by every `rediss://` target; read at start.
#[derive(Debug, Clone, Default)]
pub struct RedisTls {
    /// None: the system's CA bundle.
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// The session store's Redis (`redis_url`).
#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub key_prefix: String,
    pub timeout: Duration,
    /// First and longest delay between probes of an unreachable Redis.
    pub probe_interval: Duration,
    pub probe_max: Duration,
    /// A user's index keeps this many sessions.
    pub max_sessions_per_user: u64,
    pub tls: RedisTls,
}

/// The shared cache (`/api/cache`).
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// `cache_redis_url`, else `redis_url`; none: memory and disk only.
    pub redis_url: Option<String>,
    pub tls: RedisTls,
    pub key_prefix: String,
    pub timeout: Duration,
    /// The TTL of a namespace's generation key: the longest a value lives.
    pub max_ttl_ms: u64,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    /// Lease requests that may wait at once: half the requests in flight,
    /// so waiters never take every slot.
    pub max_waiters: usize,
    pub lease_wait: Duration,
    pub lease_ttl: Duration,
    /// First and longest delay between probes of an unreachable Redis.
    pub probe: (Duration, Duration),
}

impl Config {
    /// Expiry and size rules every store applies.
    pub fn session_limits(&self) -> Limits {
        Limits {
            ttl_ms: self.session_ttl_secs.saturating_mul(1000),
            max_lifetime_ms: self.session_max_lifetime_secs.saturating_mul(1000),
            max_metadata_bytes: self.max_metadata_bytes,
        }
    }

    /// The node's own disk store.
    pub fn local_limits(&self) -> LocalLimits {
        LocalLimits {
            cache_bytes: self.cache_capacity_bytes,
            max_journal_bytes: self.max_journal_bytes,
            min_free_bytes: self.min_free_bytes,
            flush_timeout: self.disk_flush_timeout,
        }
    }

    /// The failover store; `clock_floor` (unix ms) is the build's, not a key.
    pub fn store_limits(&self, clock_floor: u64) -> StoreLimits {
        StoreLimits {
            clock_floor,
            replay_batch: self.replay_batch,
            max_sessions_per_user: self.max_sessions_per_user,
            max_sessions: self.max_sessions,
            require_redis: self.require_redis,
            store_timeout: self.store_timeout,
            near_cache_bytes: self.near_cache_bytes,
            touch_flush: self.touch_flush,
            near_admit: self.near_admit,
        }
    }

    /// The session store's Redis client.
    pub fn redis_settings(&self) -> RedisSettings {
        RedisSettings {
            key_prefix: self.key_prefix.clone(),
            timeout: self.store_timeout,
            probe_interval: self.redis_probe_interval,
            probe_max: self.redis_probe_max,
            max_sessions_per_user: self.max_sessions_per_user,
            tls: self.redis_tls.clone(),
        }
    }

    /// The shared cache.
    pub fn cache_settings(&self) -> CacheSettings {
        CacheSettings {
            redis_url: self.cache_redis_url.clone(),
            tls: self.redis_tls.clone(),
            key_prefix: self.key_prefix.clone(),
            timeout: self.store_timeout,
            max_ttl_ms: MAX_CACHE_TTL_SECS * 1000,
            memory_bytes: self.cache_memory_bytes,
            disk_bytes: self.cache_disk_bytes,
            max_waiters: (self.max_in_flight / 2).max(1),
            lease_wait: self.cache_lease_wait,
            lease_ttl: self.cache_lease_ttl,
            probe: (self.redis_probe_interval, self.redis_probe_max),
        }
    }

    /// Admission control: workers, connections and requests in flight.
    pub fn admission(&self) -> Arc<Admission> {
        Admission::new(self.workers, self.max_connections, self.max_in_flight)
    }

    /// Which requests get an access-log line.
    pub fn access_logger(&self) -> crate::http::trace::AccessLogger {
        crate::http::trace::AccessLogger::new(self.access_log, self.access_log_sample)
    }

    /// The per-client-IP request limit, when configured.
    pub fn rate_limiter(&self) -> Option<RateLimiter> {
        RateLimiter::new(self.rate_limit_per_ip, self.rate_limit_burst)
    }

    /// The per-client-address limit on new browser sessions, with bursts
    /// of three seconds' worth.
    pub fn create_limiter(&self) -> Option<RateLimiter> {
        RateLimiter::new(
            self.create_rate_per_ip,
            self.create_rate_per_ip.saturating_mul(3),
        )
    }
}
