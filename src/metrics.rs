//! Prometheus metrics (`GET /metrics`).
//!
//! Request counters and the latency histogram are updated on the request path,
//! labelled by route *template* (`/api/sessions/:id`, never a raw path) so the
//! series count stays fixed. Store and pool figures are read from their owners
//! at scrape time by a collector, so they are never stale and cost nothing
//! between scrapes.

use crate::admission::Admission;
use crate::cache::{Cache, Tier};
use crate::store::{Mode, Store};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::Arc;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: &'static str,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabel, Histogram, fn() -> Histogram>,
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~1.6 s, doubling.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.000_05, 2.0, 16,
    ))
}

impl Metrics {
    pub fn new(
        instance_id: &str,
        store: Store,
        admission: Arc<Admission>,
        cache: Cache,
    ) -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RouteLabel, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register(
            "edgenode_http_requests",
            "HTTP requests by route template and status",
            requests.clone(),
        );
        registry.register(
            "edgenode_http_request_duration_seconds",
            "Time from request admission to response, by route template",
            latency.clone(),
        );
        registry.register_collector(Box::new(StateCollector {
            store,
            admission,
            instance_id: instance_id.to_string(),
        }));
        registry.register_collector(Box::new(CacheCollector(cache)));
        Metrics {
            registry,
            requests,
            latency,
        }
    }

    pub fn observe(&self, route: &'static str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels { route, status })
            .inc();
        self.latency
            .get_or_create(&RouteLabel { route })
            .observe(seconds);
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Reads store and pool state at scrape time.
struct StateCollector {
    store: Store,
    admission: Arc<Admission>,
    instance_id: String,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateCollector")
    }
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: i64,
) -> Result<(), std::fmt::Error> {
    let m = ConstGauge::new(v);
    m.encode(enc.encode_descriptor(name, help, None, m.metric_type())?)
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let m = ConstCounter::new(v);
    m.encode(enc.encode_descriptor(name, help, None, m.metric_type())?)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabel {
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    target: &'static str,
    commit: &'static str,
    instance_id: String,
}

impl Collector for StateCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let st = self.store.status();
        let pool = self.admission.stats();

        let info = ConstGauge::new(1i64);
        let mut fam = enc.encode_descriptor(
            "edgenode_build_info",
            "Build and instance of this node",
            None,
            info.metric_type(),
        )?;
        info.encode(fam.encode_family(&BuildLabels {
            version: env!("CARGO_PKG_VERSION"),
            target: env!("EDGENODE_TARGET"),
            commit: env!("EDGENODE_COMMIT"),
            instance_id: self.instance_id.clone(),
        })?)?;

        let mut fam = enc.encode_descriptor(
            "edgenode_store_mode",
            "1 for the store currently serving requests",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for mode in [Mode::Redis, Mode::Sled] {
            ConstGauge::new(i64::from(st.active == mode)).encode(fam.encode_family(
                &ModeLabel {
                    mode: mode.as_str(),
                },
            )?)?;
        }

        gauge(
            &mut enc,
            "edgenode_redis_reachable",
            "1 when the last Redis operation or probe succeeded",
            i64::from(st.redis_reachable),
        )?;
        gauge(
            &mut enc,
            "edgenode_sessions_active",
            "Live sessions (Redis index in Redis mode, local store otherwise)",
            st.sessions_active as i64,
        )?;
        gauge(
            &mut enc,
            "edgenode_pending_sync",
            "Journaled operations waiting to be replayed into Redis",
            st.pending_sync as i64,
        )?;
        counter(
            &mut enc,
            "edgenode_redis_failovers",
            "Switches from Redis to the local store",
            st.failovers,
        )?;
        counter(
            &mut enc,
            "edgenode_reconciliations",
            "Completed journal replays into Redis",
            st.reconciliations,
        )?;
        counter(
            &mut enc,
            "edgenode_replayed_operations",
            "Journal operations replayed into Redis",
            st.replayed_ops,
        )?;
        counter(
            &mut enc,
            "edgenode_corrupt_records",
            "Records at rest that failed to decode",
            st.corrupt_records,
        )?;
        counter(
            &mut enc,
            "edgenode_deletions_heard",
            "Deletions and rotations made on other nodes, heard through Redis pub/sub",
            st.deletions_heard,
        )?;
        counter(
            &mut enc,
            "edgenode_replay_dropped",
            "Journal operations Redis rejected for good, dropped after bounded tries",
            st.replay_dropped,
        )?;
        gauge(
            &mut enc,
            "edgenode_journal_bytes",
            "Bytes of the outage journal (budget: max_journal_mb)",
            st.journal_bytes as i64,
        )?;
        counter(
            &mut enc,
            "edgenode_touches_unjournaled",
            "Requests served while the journal or the disk was full, whose counts never reach Redis",
            st.touches_unjournaled,
        )?;
        gauge(
            &mut enc,
            "edgenode_redis_config_error",
            "1 while Redis refuses this node's credentials or database (fix redis_url)",
            i64::from(st.redis_config_error),
        )?;
        gauge(
            &mut enc,
            "edgenode_degraded",
            "1 while health says degraded: a disk fault or the disk at its reserve, an unset clock, a Redis configuration error, or no Redis under require_redis",
            i64::from(st.degraded.is_some()),
        )?;
        if let Some(near) = st.near {
            gauge(
                &mut enc,
                "edgenode_near_cache_up",
                "1 while the near cache's invalidation stream from Redis is up and the cache serves",
                i64::from(near.link_up),
            )?;
            counter(
                &mut enc,
                "edgenode_near_cache_hits",
                "Touches answered from the near cache, without a Redis round trip",
                near.hits,
            )?;
            counter(
                &mut enc,
                "edgenode_near_cache_misses",
                "Touches of sessions the near cache did not hold (read from Redis and cached)",
                near.misses,
            )?;
            counter(
                &mut enc,
                "edgenode_near_cache_invalidations",
                "Near-cache copies dropped because the session changed (anywhere) or the stream went down",
                near.invalidations,
            )?;
            counter(
                &mut enc,
                "edgenode_near_cache_evictions",
                "Near-cache copies evicted to stay within near_cache_mb",
                near.evictions,
            )?;
            counter(
                &mut enc,
                "edgenode_near_cache_unadmitted",
                "Touches of sessions not used again within near_admit_ms: counted in Redis at once, not cached",
                near.unadmitted,
            )?;
            gauge(
                &mut enc,
                "edgenode_near_cache_bytes",
                "Estimated memory held by near-cache copies (bound: near_cache_mb)",
                near.bytes as i64,
            )?;
            gauge(
                &mut enc,
                "edgenode_near_cache_entries",
                "Sessions held in the near cache",
                near.entries as i64,
            )?;
            gauge(
                &mut enc,
                "edgenode_near_cache_pending_touches",
                "Requests counted in the near cache and not yet written to Redis",
                near.pending as i64,
            )?;
        }
        gauge(
            &mut enc,
            "edgenode_pool_workers",
            "Request worker threads",
            pool.workers as i64,
        )?;
        gauge(
            &mut enc,
            "edgenode_pool_in_flight",
            "Requests being served",
            pool.in_flight as i64,
        )?;
        gauge(
            &mut enc,
            "edgenode_disk_flush_waiters",
            "Requests waiting for a disk flush",
            self.store.sled().commits_waiting() as i64,
        )?;
        counter(
            &mut enc,
            "edgenode_disk_fsyncs",
            "Flushes of the local database that wrote and synced data to disk (group commits and lazy flushes; a flush with nothing new syncs nothing)",
            self.store.sled().disk_syncs(),
        )?;
        if let Some(written) = crate::disk::Database::process_written_bytes() {
            counter(
                &mut enc,
                "edgenode_disk_written_bytes",
                "Bytes the node has caused to be written to storage (/proc/self/io write_bytes): the SD card's wear",
                written,
            )?;
        }
        counter(
            &mut enc,
            "edgenode_mirror_touches_skipped",
            "Uses served in Redis mode whose disk-mirror copy was within mirror_lag_secs and so was not rewritten",
            self.store.sled().mirror_touches_skipped(),
        )?;
        gauge(
            &mut enc,
            "edgenode_open_connections",
            "Open client connections",
            pool.connections as i64,
        )?;
        counter(
            &mut enc,
            "edgenode_pool_completed",
            "Requests served",
            pool.completed,
        )?;
        counter(
            &mut enc,
            "edgenode_rejected_requests",
            "Requests and connections refused with 503 by admission control",
            pool.rejected,
        )?;
        Ok(())
    }
}

/// The shared cache's figures, read at scrape time.
struct CacheCollector(Cache);

impl std::fmt::Debug for CacheCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CacheCollector")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierLabel {
    tier: &'static str,
}

/// One counter or gauge family with a value per tier.
fn per_tier<M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: &[(Tier, M)],
) -> Result<(), std::fmt::Error> {
    let Some((_, first)) = values.first() else {
        return Ok(());
    };
    let mut fam = enc.encode_descriptor(name, help, None, first.metric_type())?;
    for (tier, m) in values {
        m.encode(fam.encode_family(&TierLabel {
            tier: tier.as_str(),
        })?)?;
    }
    Ok(())
}

impl Collector for CacheCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let st = self.0.stats();
        let tiers = |v: [u64; 3]| Tier::ALL.map(|t| (t, ConstCounter::new(v[t as usize])));
        per_tier(
            &mut enc,
            "edgenode_cache_hits",
            "Shared cache lookups answered by a tier",
            &tiers(st.hits),
        )?;
        per_tier(
            &mut enc,
            "edgenode_cache_misses",
            "Shared cache lookups a tier could not answer",
            &tiers(st.misses),
        )?;
        let (mem, disk) = (Tier::Memory, Tier::Disk);
        per_tier(
            &mut enc,
            "edgenode_cache_evictions",
            "Values pushed out of a local tier to stay within its bytes",
            &[
                (mem, ConstCounter::new(st.memory_evictions)),
                (disk, ConstCounter::new(st.disk_evictions)),
            ],
        )?;
        per_tier(
            &mut enc,
            "edgenode_cache_bytes",
            "Bytes a local tier holds (values, keys and bookkeeping)",
            &[
                (mem, ConstGauge::new(st.memory_bytes as i64)),
                (disk, ConstGauge::new(st.disk_bytes as i64)),
            ],
        )?;
        per_tier(
            &mut enc,
            "edgenode_cache_bytes_limit",
            "The byte bound of a local tier (cache_memory_mb, cache_disk_mb)",
            &[
                (mem, ConstGauge::new(st.memory_budget as i64)),
                (disk, ConstGauge::new(st.disk_budget as i64)),
            ],
        )?;
        for (name, help, v) in [
            (
                "edgenode_cache_lease_grants",
                "Fill leases granted",
                st.lease_grants,
            ),
            (
                "edgenode_cache_lease_waits",
                "Lease requests that waited for another client's fill",
                st.lease_waits,
            ),
            (
                "edgenode_cache_lease_wait_timeouts",
                "Lease waits that ended without a value",
                st.lease_wait_timeouts,
            ),
            (
                "edgenode_cache_lease_refused",
                "PUTs refused (409) for an expired or foreign lease",
                st.lease_refused,
            ),
            (
                "edgenode_cache_events_heard",
                "Invalidations from other nodes heard through Redis",
                st.events_heard,
            ),
            (
                "edgenode_cache_replayed",
                "Deletions and purges made during an outage, replayed into Redis",
                st.replayed,
            ),
        ] {
            counter(&mut enc, name, help, v)?;
        }
        for (name, help, v) in [
            (
                "edgenode_cache_lease_waiting",
                "Lease requests waiting now",
                st.lease_waiting as i64,
            ),
            (
                "edgenode_cache_pending_invalidations",
                "Deletions and purges journaled during an outage, not yet replayed",
                st.pending_invalidations as i64,
            ),
            (
                "edgenode_cache_redis_reachable",
                "1 while the cache's Redis answers",
                i64::from(st.redis_reachable),
            ),
            (
                "edgenode_cache_subscribed",
                "1 while this node hears the cache's invalidations",
                i64::from(st.subscribed),
            ),
        ] {
            gauge(&mut enc, name, help, v)?;
        }
        Ok(())
    }
}
