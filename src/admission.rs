//! Admission control: the bounds that keep a small board predictable.
//!
//! The worker pool itself is the tokio runtime, built in `main.rs` with exactly
//! `workers` threads and at most `blocking_threads` blocking threads; nothing
//! spawns a thread per request. What this module adds is the refusal: above
//! `max_connections` open connections or `max_in_flight` requests being served,
//! the node answers 503 + `Retry-After` at once instead of queueing, so memory
//! and latency stay bounded and the balancer can try another node. And, when
//! configured, a per-client rate limit ([`RateLimiter`], 429).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Debug)]
pub struct Admission {
    pub workers: usize,
    max_connections: usize,
    max_in_flight: usize,
    connections: AtomicUsize,
    in_flight: AtomicUsize,
    completed: AtomicU64,
    rejected: AtomicU64,
}

/// Figures for `/api/health` and `/metrics`.
#[derive(Debug, Clone, Copy)]
pub struct PoolStats {
    pub workers: usize,
    pub connections: usize,
    pub in_flight: usize,
    pub completed: u64,
    pub rejected: u64,
}

impl Admission {
    pub fn new(workers: usize, max_connections: usize, max_in_flight: usize) -> Arc<Admission> {
        Arc::new(Admission {
            workers,
            max_connections,
            max_in_flight,
            connections: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            completed: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        })
    }

    /// A slot for a new connection, or `None` when the node is full.
    pub fn try_connect(self: &Arc<Self>) -> Option<ConnectionSlot> {
        acquire(&self.connections, self.max_connections)
            .map(|_| ConnectionSlot(self.clone()))
            .or_else(|| {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                None
            })
    }

    /// A slot for a request, or `None` when too many are being served.
    pub fn try_admit(self: &Arc<Self>) -> Option<RequestSlot> {
        acquire(&self.in_flight, self.max_in_flight)
            .map(|_| RequestSlot(self.clone()))
            .or_else(|| {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                None
            })
    }

    pub fn stats(&self) -> PoolStats {
        PoolStats {
            workers: self.workers,
            connections: self.connections.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            completed: self.completed.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
        }
    }
}

/// Increments `counter` unless it is at `max`.
fn acquire(counter: &AtomicUsize, max: usize) -> Option<()> {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| ())
}

/// Held for a connection's lifetime.
pub struct ConnectionSlot(Arc<Admission>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Held while a request is served.
pub struct RequestSlot(Arc<Admission>);

impl Drop for RequestSlot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.completed.fetch_add(1, Ordering::Relaxed);
    }
}

/// Per-client rate limiting: a token bucket per client (an IPv4 address or
/// an IPv6 /64), refilled at `rate` tokens a second up to `burst`. Two are
/// used: every request (`rate_limit_per_ip`, off by default) and the
/// sessions `GET /api/session` creates (`create_rate_per_ip`, on by
/// default).
///
/// Memory stays bounded: each of the shards holds at most `MAX_CLIENTS_PER_SHARD`
/// buckets. A full shard first forgets buckets that have refilled (clients
/// that went quiet, at most every `SWEEP_EVERY`); if it is still full, the
/// new client shares one overflow bucket with every other such client: a
/// flood of spoofed addresses neither grows the node nor gets through
/// unlimited.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    shards: Vec<std::sync::Mutex<Shard>>,
}

/// Clients whose address falls here, and when the shard was last cleared of
/// clients back at a full bucket (a full shard is cleared at most every
/// [`SWEEP_EVERY`], so a flood cannot make every request walk it).
struct Shard {
    clients: std::collections::HashMap<std::net::IpAddr, Bucket>,
    swept: Option<std::time::Instant>,
}

const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: std::time::Instant,
}

const RATE_SHARDS: usize = 16;
const MAX_CLIENTS_PER_SHARD: usize = 4096;

impl RateLimiter {
    /// `None` when `rate` is 0 (no limit).
    pub fn new(rate: u32, burst: u32) -> Option<RateLimiter> {
        (rate > 0).then(|| RateLimiter {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            shards: (0..RATE_SHARDS)
                .map(|_| {
                    std::sync::Mutex::new(Shard {
                        clients: std::collections::HashMap::new(),
                        swept: None,
                    })
                })
                .collect(),
        })
    }

    /// Takes one token for the client at `ip`; `Err(seconds)` says when the
    /// next one is due (for `Retry-After`). An IPv6 client is keyed by its
    /// /64 (one host holds a whole /64), an IPv4-mapped one as IPv4. When a
    /// shard is full of clients still within their limits, new clients
    /// share one overflow bucket: a flood from many addresses is bounded,
    /// never let through.
    pub fn check(&self, ip: std::net::IpAddr, now: std::time::Instant) -> Result<(), u64> {
        let mut key = client_key(ip);
        let shard = &self.shards[shard_of(key)];
        let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
        let (rate, burst) = (self.rate, self.burst);
        let refilled =
            |b: &Bucket| (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(burst);
        if !shard.clients.contains_key(&key) && shard.clients.len() >= MAX_CLIENTS_PER_SHARD {
            let due = shard
                .swept
                .map_or(true, |at| now.saturating_duration_since(at) >= SWEEP_EVERY);
            if due {
                shard.swept = Some(now);
                shard.clients.retain(|_, b| refilled(b) < burst);
            }
            if shard.clients.len() >= MAX_CLIENTS_PER_SHARD {
                key = OVERFLOW;
            }
        }
        let map = &mut shard.clients;
        let bucket = map.entry(key).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let tokens = refilled(bucket);
        if tokens >= 1.0 {
            *bucket = Bucket {
                tokens: tokens - 1.0,
                at: now,
            };
            Ok(())
        } else {
            *bucket = Bucket { tokens, at: now };
            Err(((1.0 - tokens) / rate).ceil().max(1.0) as u64)
        }
    }
}

/// The bucket shared by clients that find their shard full.
const OVERFLOW: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);

/// What a client is limited as: an IPv4 address, or an IPv6 /64.
fn client_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip.to_canonical() {
        std::net::IpAddr::V6(a) => std::net::IpAddr::V6(std::net::Ipv6Addr::from(
            u128::from(a) & !((1u128 << 64) - 1),
        )),
        v4 => v4,
    }
}

/// Spreads clients over the shards (addresses are not secret; any mix will do).
fn shard_of(ip: std::net::IpAddr) -> usize {
    let n = match ip {
        std::net::IpAddr::V4(a) => u32::from(a) as u64,
        std::net::IpAddr::V6(a) => {
            let v = u128::from(a);
            (v as u64) ^ ((v >> 64) as u64)
        }
    };
    (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60) as usize % RATE_SHARDS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_enforced_and_released() {
        let a = Admission::new(2, 1, 2);
        let r1 = a.try_admit().unwrap();
        let _r2 = a.try_admit().unwrap();
        assert!(a.try_admit().is_none());
        drop(r1);
        assert!(a.try_admit().is_some());
        let c = a.try_connect().unwrap();
        assert!(a.try_connect().is_none());
        drop(c);
        assert!(a.try_connect().is_some());
        let s = a.stats();
        assert_eq!((s.rejected, s.completed), (2, 2));
    }
}

#[cfg(test)]
mod rate_tests {
    use super::RateLimiter;
    use std::time::{Duration, Instant};

    #[test]
    fn a_client_gets_its_burst_then_the_rate_and_others_are_unaffected() {
        let limiter = RateLimiter::new(10, 3).expect("limit on");
        let (a, b) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check(a, t0).is_ok());
        }
        assert_eq!(limiter.check(a, t0), Err(1), "burst spent");
        assert!(
            limiter.check(b, t0).is_ok(),
            "another client has its own bucket"
        );
        // 10 per second: one token back after 100 ms.
        assert!(limiter.check(a, t0 + Duration::from_millis(100)).is_ok());
        assert!(limiter.check(a, t0 + Duration::from_millis(100)).is_err());
        assert!(RateLimiter::new(0, 5).is_none(), "0 = off");
    }

    #[test]
    fn an_ipv6_client_is_limited_by_its_64_and_a_full_table_never_fails_open() {
        let limiter = RateLimiter::new(1, 1).expect("limit on");
        let t0 = Instant::now();
        let a: std::net::IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same_64: std::net::IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert!(limiter.check(a, t0).is_ok());
        assert!(limiter.check(same_64, t0).is_err(), "one /64, one client");
        let mapped: std::net::IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert!(limiter.check(mapped, t0).is_ok());
        assert!(limiter.check("192.0.2.7".parse().unwrap(), t0).is_err());
        // Many more clients than the table holds, all at their limit: the
        // newcomers share the overflow bucket, most of them are refused.
        let mut allowed = 0;
        for i in 0..(super::RATE_SHARDS * super::MAX_CLIENTS_PER_SHARD * 2) as u32 {
            let ip = std::net::IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            if limiter.check(ip, t0).is_ok() {
                allowed += 1;
            }
        }
        assert!(
            allowed <= super::RATE_SHARDS * super::MAX_CLIENTS_PER_SHARD + super::RATE_SHARDS,
            "{allowed} allowed"
        );
    }
}
