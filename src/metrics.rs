//! Prometheus metrics (`GET /metrics`).
//!
//! Request counters and the latency histogram are updated on the request path,
//! labelled by route *template* (`/api/sessions/:id`, never a raw path) so the
//! series count stays fixed. Store and pool figures are read from their owners
//! at scrape time by a collector, so they are never stale and cost nothing
//! between scrapes.

use crate::admission::Admission;
use crate::cache::Cache;
use crate::status::{Kind, NodeStatus, Reading, FIGURES};
use crate::store::{Mode, Store};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
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
        registry.register_collector(Box::new(StatusCollector {
            store,
            admission,
            cache,
            instance_id: instance_id.to_string(),
        }));
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

/// Reads the node's status at scrape time and renders it: the build, the
/// store's mode, then every figure of [`FIGURES`] that has a metric.
struct StatusCollector {
    store: Store,
    admission: Arc<Admission>,
    cache: Cache,
    instance_id: String,
}

impl std::fmt::Debug for StatusCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StatusCollector")
    }
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierLabel {
    tier: &'static str,
}

/// One value of a figure, as its metric type.
fn encode_one(
    fam: prometheus_client::encoding::MetricEncoder,
    kind: Kind,
    v: u64,
) -> Result<(), std::fmt::Error> {
    match kind {
        Kind::Gauge => ConstGauge::new(v as i64).encode(fam),
        Kind::Counter => ConstCounter::new(v).encode(fam),
    }
}

impl Collector for StatusCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let status = NodeStatus::read(&self.store, &self.admission, &self.cache);

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
            MetricType::Gauge,
        )?;
        for mode in [Mode::Redis, Mode::Sled] {
            ConstGauge::new(i64::from(status.store.active == mode)).encode(fam.encode_family(
                &ModeLabel {
                    mode: mode.as_str(),
                },
            )?)?;
        }

        for f in FIGURES {
            let (Some((name, kind, help)), Some(reading)) = (f.metric, (f.read)(&status)) else {
                continue;
            };
            let metric_type = match kind {
                Kind::Gauge => MetricType::Gauge,
                Kind::Counter => MetricType::Counter,
            };
            let mut fam = enc.encode_descriptor(name, help, None, metric_type)?;
            match reading {
                Reading::Number(v) => encode_one(fam, kind, v)?,
                Reading::Flag(b) => encode_one(fam, kind, u64::from(b))?,
                Reading::PerTier(values) => {
                    for (tier, v) in values {
                        let labels = TierLabel {
                            tier: tier.as_str(),
                        };
                        encode_one(fam.encode_family(&labels)?, kind, v)?;
                    }
                }
                Reading::Text(_) => {}
            }
        }
        Ok(())
    }
}
