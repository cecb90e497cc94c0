//! Prometheus metrics (prometheus-client), all prefixed `mesh_`. Labels are
//! bounded: service, endpoint (from the state), direction, reason; never a
//! client port or anything per connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    pub service: String,
    pub endpoint: String,
    pub direction: &'static str,
}

impl ConnLabels {
    fn endpoint_labels(&self) -> EndpointLabels {
        EndpointLabels { service: self.service.clone(), endpoint: self.endpoint.clone() }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub service: String,
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CounterLabels {
    pub counter: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailedLabels {
    pub service: String,
    pub direction: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub service: String,
    pub endpoint: String,
    pub direction: &'static str,
    /// `2xx`..`5xx`; for gRPC the call's status (`OK`, `UNAVAILABLE`, ...).
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

/// Every `reason` a failed connection can have (the connect error's
/// reasons); series are dropped by these when a service goes.
pub const FAILURE_REASONS: [&str; 13] = [
    "refused",
    "unreachable",
    "reset",
    "timeout",
    "io",
    "tls_handshake",
    "tunnel",
    "upstream",
    "denied",
    "no_identity",
    "no_certificates",
    "no_endpoint",
    "rate_limited",
];

/// One endpoint of one service as a scrape shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointGauges {
    pub service: String,
    pub endpoint: String,
    pub healthy: bool,
    pub effective_weight: u16,
    pub ewma_rtt: std::time::Duration,
}

/// What a scrape reads from the running daemon.
pub trait Live: Send + Sync + 'static {
    /// The kernel programs' counters (the STATS map), by name.
    fn kernel(&self) -> Vec<(&'static str, u64)>;
    fn endpoints(&self) -> Vec<EndpointGauges>;
}

/// Encodes what [`Live`] reads at scrape time: nothing is copied between
/// scrapes, and nothing is kept for endpoints that left.
struct LiveCollector(Arc<OnceLock<Arc<dyn Live>>>);

impl std::fmt::Debug for LiveCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LiveCollector")
    }
}

impl Collector for LiveCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(live) = self.0.get() else { return Ok(()) };
        let kernel = live.kernel();
        let mut family = encoder.encode_descriptor(
            "kernel_events",
            "Counters of the kernel programs (STATS map)",
            None,
            MetricType::Counter,
        )?;
        for (counter, v) in kernel {
            ConstCounter::new(v).encode(family.encode_family(&CounterLabels { counter })?)?;
        }
        let endpoints = live.endpoints();
        let labels = |e: &EndpointGauges| EndpointLabels { service: e.service.clone(), endpoint: e.endpoint.clone() };
        let mut family = encoder.encode_descriptor(
            "endpoint_healthy",
            "1 when the endpoint passes its active checks",
            None,
            MetricType::Gauge,
        )?;
        for e in &endpoints {
            ConstGauge::new(i64::from(e.healthy)).encode(family.encode_family(&labels(e))?)?;
        }
        let mut family = encoder.encode_descriptor(
            "endpoint_effective_weight",
            "Weight the balancer uses now",
            None,
            MetricType::Gauge,
        )?;
        for e in &endpoints {
            ConstGauge::new(i64::from(e.effective_weight)).encode(family.encode_family(&labels(e))?)?;
        }
        let mut family = encoder.encode_descriptor(
            "endpoint_ewma_rtt",
            "Peak-EWMA of connect time",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?;
        for e in &endpoints {
            ConstGauge::new(e.ewma_rtt.as_secs_f64()).encode(family.encode_family(&labels(e))?)?;
        }
        Ok(())
    }
}

/// What counts into endpoint series: the rows `meshctl stats` shows.
pub trait StatsSource: Send + Sync + 'static {
    /// `meshctl stats` rows of the series this source counts into.
    fn stats_rows(&self) -> Vec<StatsRow> {
        Vec::new()
    }
}

/// One row of `meshctl stats`: an endpoint of a service port, one direction.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatsRow {
    pub service: String,
    pub endpoint: String,
    pub direction: String,
    pub opened: u64,
    pub closed: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Failed connections of the service port (outbound only).
    pub service_errors: u64,
    /// Peak-EWMA of connect time (outbound only).
    pub ewma_rtt_ms: Option<f64>,
    /// Requests that ended (request-aware ports).
    pub requests: u64,
    /// Of those, the share that succeeded: HTTP status below 500, gRPC
    /// status OK. None without requests.
    pub success_rate: Option<f64>,
    /// Requests per second over the last [`RATE_WINDOW_SECS`] seconds.
    /// None without requests.
    pub rate_per_second: Option<f64>,
    /// Response-header latency quantiles, to within 25%.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl StatsRow {
    /// The row of an endpoint that has carried nothing (no series made).
    pub fn idle(service: &str, endpoint: &str, direction: &str, service_errors: u64, ewma_rtt_ms: Option<f64>) -> Self {
        StatsRow {
            service: service.to_owned(),
            endpoint: endpoint.to_owned(),
            direction: direction.to_owned(),
            opened: 0,
            closed: 0,
            bytes_sent: 0,
            bytes_received: 0,
            service_errors,
            ewma_rtt_ms,
            requests: 0,
            success_rate: None,
            rate_per_second: None,
            p50_ms: None,
            p99_ms: None,
        }
    }
}

impl EndpointSeries {
    /// This series as a stats row.
    pub fn row(&self, service_errors: u64, ewma_rtt_ms: Option<f64>) -> StatsRow {
        let by_class = self.requests_by_class();
        let requests: u64 = by_class.iter().map(|(_, n)| n).sum();
        let ok: u64 = by_class.iter().filter(|(c, _)| succeeded(c)).map(|(_, n)| n).sum();
        StatsRow {
            p50_ms: self.latency.quantile_ms(0.5),
            p99_ms: self.latency.quantile_ms(0.99),
            requests,
            rate_per_second: (requests > 0).then(|| self.rate.per_second(now_secs())),
            success_rate: (requests > 0).then(|| ok as f64 / requests as f64),
            service: self.labels.service.clone(),
            endpoint: self.labels.endpoint.clone(),
            direction: self.labels.direction.to_owned(),
            opened: self.opened.get(),
            closed: self.closed.get(),
            bytes_sent: self.sent.get(),
            bytes_received: self.received.get(),
            service_errors,
            ewma_rtt_ms,
        }
    }
}

/// Response latencies of one endpoint in log-spaced buckets (each 25%
/// wider than the one before, from 20 µs), for `meshctl stats`' p50 and
/// p99: a quantile is known to within 25%. Lock-free, fixed size.
#[derive(Debug)]
pub struct LatencySketch {
    buckets: [AtomicU64; SKETCH_BUCKETS],
}

const SKETCH_BUCKETS: usize = 64;
const SKETCH_FIRST_US: f64 = 20.0;
const SKETCH_GROWTH: f64 = 1.25;

impl Default for LatencySketch {
    fn default() -> Self {
        Self { buckets: std::array::from_fn(|_| AtomicU64::new(0)) }
    }
}

impl LatencySketch {
    fn upper_us(i: usize) -> f64 {
        SKETCH_FIRST_US * SKETCH_GROWTH.powi(i as i32)
    }

    pub fn observe(&self, d: std::time::Duration) {
        let us = d.as_secs_f64() * 1e6;
        let i =
            if us <= SKETCH_FIRST_US { 0 } else { ((us / SKETCH_FIRST_US).ln() / SKETCH_GROWTH.ln()).ceil() as usize };
        self.buckets[i.min(SKETCH_BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
    }

    /// The `q` quantile (0..1) in milliseconds: the upper bound of its
    /// bucket. None before the first observation.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some((Self::upper_us(i) / 10.0).round() / 100.0);
            }
        }
        None
    }
}

/// An endpoint series' latency sketch and request rate.
type Recent = (Arc<LatencySketch>, Arc<RecentRate>);

/// Seconds the request rate of `meshctl stats` is taken over.
pub const RATE_WINDOW_SECS: u64 = 10;

/// Seconds since this process first asked, with their fraction: the clock
/// of the rate limiters (and, whole, of [`RecentRate`] and retry budgets).
pub fn clock_secs() -> f64 {
    crate::env::process_secs()
}

/// [`clock_secs`] in whole seconds.
pub fn now_secs() -> u64 {
    clock_secs() as u64
}

/// Requests of the last [`RATE_WINDOW_SECS`] seconds, one bucket per
/// second. Each bucket packs its second (high 32 bits) and its count (low
/// 32) in one atomic, so the first request of a new second resets it
/// without losing a concurrent one. Lock-free, fixed size.
#[derive(Debug, Default)]
pub struct RecentRate {
    buckets: [AtomicU64; RATE_WINDOW_SECS as usize],
}

impl RecentRate {
    /// Counts one request at second `now`.
    pub fn record(&self, now: u64) {
        let b = &self.buckets[(now % RATE_WINDOW_SECS) as usize];
        let second = now & 0xffff_ffff;
        let _ = b.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
            Some(if v >> 32 == second { v.saturating_add(1) } else { (second << 32) | 1 })
        });
    }

    /// The mean rate over the window ending with second `now`, this second
    /// included.
    pub fn per_second(&self, now: u64) -> f64 {
        let oldest = now.saturating_sub(RATE_WINDOW_SECS - 1) & 0xffff_ffff;
        let now = now & 0xffff_ffff;
        let sum: u64 = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .filter(|v| (oldest..=now).contains(&(v >> 32)))
            .map(|v| v & 0xffff_ffff)
            .sum();
        sum as f64 / RATE_WINDOW_SECS as f64
    }
}

/// One endpoint's series of one service port, looked up once per state so
/// that a connection only touches atomics.
#[derive(Clone, Debug)]
pub struct EndpointSeries {
    pub labels: ConnLabels,
    pub opened: Counter,
    pub closed: Counter,
    pub sent: Counter,
    pub received: Counter,
    pub connect_latency: Histogram,
    pub ejections: Counter,
    /// `mesh_requests_total`, by class when a response ends.
    requests: Family<RequestLabels, Counter>,
    /// Its counters by [`REQUEST_CLASSES`] index, once looked up.
    by_class: [OnceLock<Counter>; REQUEST_CLASSES.len()],
    /// Response-header latencies, for `meshctl stats`.
    pub latency: Arc<LatencySketch>,
    /// Recent requests, for `meshctl stats`' rate.
    rate: Arc<RecentRate>,
}

impl EndpointSeries {
    /// Counts one finished request of this endpoint by its class.
    /// The counter of each class is looked up once per state, on its
    /// first request, so a request only touches an atomic.
    pub fn request(&self, class: &'static str) {
        self.rate.record(now_secs());
        let Some(i) = REQUEST_CLASSES.iter().position(|c| *c == class) else { return };
        self.by_class[i]
            .get_or_init(|| {
                let l = RequestLabels {
                    service: self.labels.service.clone(),
                    endpoint: self.labels.endpoint.clone(),
                    direction: self.labels.direction,
                    class,
                };
                self.requests.get_or_create(&l).clone()
            })
            .inc();
    }

    /// Requests of this endpoint that ended, by class (for `meshctl stats`).
    pub fn requests_by_class(&self) -> Vec<(&'static str, u64)> {
        REQUEST_CLASSES
            .iter()
            .filter_map(|class| {
                let l = RequestLabels {
                    service: self.labels.service.clone(),
                    endpoint: self.labels.endpoint.clone(),
                    direction: self.labels.direction,
                    class,
                };
                self.requests.get(&l).map(|c| (*class, c.get()))
            })
            .collect()
    }
}

/// Whether a request of this class succeeded: HTTP below 500, gRPC `OK`.
pub fn succeeded(class: &str) -> bool {
    match REQUEST_CLASSES.iter().position(|c| *c == class) {
        Some(i) if i < GRPC_CLASSES => class != "5xx",
        _ => class == "OK",
    }
}

/// Where the gRPC statuses start in [`REQUEST_CLASSES`]: code 0 (`OK`).
pub const GRPC_CLASSES: usize = 5;

/// Every `class` a request can have: HTTP status classes, then the gRPC
/// statuses by code.
pub const REQUEST_CLASSES: [&str; 22] = [
    "1xx",
    "2xx",
    "3xx",
    "4xx",
    "5xx",
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// One service port's series, looked up once per state.
#[derive(Clone, Debug)]
pub struct ServiceSeries {
    pub labels: ServiceLabels,
    /// `mesh_requests_total` of requests that reached no endpoint.
    requests: Family<RequestLabels, Counter>,
    /// Time from a request to its response's headers.
    pub response_latency: Histogram,
    /// `mesh_connections_failed_total`, by reason when one fails.
    failed: Family<FailedLabels, Counter>,
    pub duration: Histogram,
    pub retries: Counter,
    /// Retries the retry budget refused.
    pub budget_exhausted: Counter,
    /// Requests or connections the rate limit refused.
    pub rate_limited: Counter,
}

impl ServiceSeries {
    /// Counts a request that reached no endpoint (`endpoint=""`).
    pub fn request_failed(&self, class: &'static str) {
        let l = RequestLabels {
            service: self.labels.service.clone(),
            endpoint: String::new(),
            direction: self.labels.direction,
            class,
        };
        self.requests.get_or_create(&l).inc();
    }

    /// Connections of this service port that failed, for any reason.
    pub fn failures(&self) -> u64 {
        FAILURE_REASONS
            .iter()
            .filter_map(|reason| {
                let l = FailedLabels { service: self.labels.service.clone(), direction: self.labels.direction, reason };
                self.failed.get(&l).map(|c| c.get())
            })
            .sum()
    }

    /// Counts a connection that failed, by the reason of its error.
    pub fn failed(&self, reason: &'static str) {
        let l = FailedLabels { service: self.labels.service.clone(), direction: self.labels.direction, reason };
        self.failed.get_or_create(&l).inc();
    }
}

fn duration_family() -> Family<ServiceLabels, Histogram, fn() -> Histogram> {
    fn ctor() -> Histogram {
        Histogram::new(exponential_buckets(0.001, 2.0, 16))
    }
    Family::new_with_constructor(ctor)
}

fn response_latency_family() -> Family<ServiceLabels, Histogram, fn() -> Histogram> {
    fn ctor() -> Histogram {
        Histogram::new(exponential_buckets(0.000_1, 2.0, 18))
    }
    Family::new_with_constructor(ctor)
}

fn latency_family() -> Family<EndpointLabels, Histogram, fn() -> Histogram> {
    fn ctor() -> Histogram {
        Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
    }
    Family::new_with_constructor(ctor)
}

pub struct Metrics {
    registry: Registry,
    pub opened: Family<ConnLabels, Counter>,
    pub closed: Family<ConnLabels, Counter>,
    pub failed: Family<FailedLabels, Counter>,
    pub bytes_sent: Family<ConnLabels, Counter>,
    pub bytes_received: Family<ConnLabels, Counter>,
    pub duration: Family<ServiceLabels, Histogram, fn() -> Histogram>,
    pub requests: Family<RequestLabels, Counter>,
    pub response_latency: Family<ServiceLabels, Histogram, fn() -> Histogram>,
    pub connect_latency: Family<EndpointLabels, Histogram, fn() -> Histogram>,
    pub retries: Family<ServiceLabels, Counter>,
    pub budget_exhausted: Family<ServiceLabels, Counter>,
    pub rate_limited: Family<ServiceLabels, Counter>,
    pub ejections: Family<EndpointLabels, Counter>,
    pub tunnel: Family<CounterLabels, Counter>,
    pub tls_failures: Family<ReasonLabels, Counter>,
    pub outbound: Family<EventLabels, Counter>,
    pub outbound_active: Gauge,
    pub outbound_bytes: Family<DirectionLabels, Counter>,
    pub generation: Gauge,
    /// What a scrape reads from the running daemon (kernel counters,
    /// endpoint state), once it runs.
    live: Arc<OnceLock<Arc<dyn Live>>>,
    /// Latency sketches by endpoint series, kept across state writes like
    /// the registered families.
    sketches: std::sync::Mutex<HashMap<ConnLabels, Recent>>,
    log_drops: Counter,
    log_drop_source: std::sync::OnceLock<super::logwriter::DroppedLines>,
    pub map_sync: Histogram,
    pub spans_exported: Counter,
    pub spans_dropped: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("mesh");
        let m = Self {
            opened: Family::default(),
            closed: Family::default(),
            failed: Family::default(),
            bytes_sent: Family::default(),
            bytes_received: Family::default(),
            duration: duration_family(),
            requests: Family::default(),
            response_latency: response_latency_family(),
            connect_latency: latency_family(),
            retries: Family::default(),
            budget_exhausted: Family::default(),
            rate_limited: Family::default(),
            ejections: Family::default(),
            tunnel: Family::default(),
            tls_failures: Family::default(),
            outbound: Family::default(),
            outbound_active: Gauge::default(),
            outbound_bytes: Family::default(),
            generation: Gauge::default(),
            live: Arc::new(OnceLock::new()),
            sketches: std::sync::Mutex::new(HashMap::new()),
            log_drops: Counter::default(),
            log_drop_source: std::sync::OnceLock::new(),
            map_sync: Histogram::new(exponential_buckets(0.000_01, 2.0, 16)),
            spans_exported: Counter::default(),
            spans_dropped: Counter::default(),
            registry: Registry::default(),
        };
        r.register("connections_opened", "Connections forwarded to an endpoint", m.opened.clone());
        r.register("connections_closed", "Forwarded connections that ended", m.closed.clone());
        r.register("connections_failed", "Connections closed before reaching an endpoint, by reason", m.failed.clone());
        r.register_with_unit("sent", "Bytes sent to endpoints", Unit::Bytes, m.bytes_sent.clone());
        r.register_with_unit("received", "Bytes received from endpoints", Unit::Bytes, m.bytes_received.clone());
        r.register_with_unit(
            "connection_duration",
            "How long forwarded connections lasted",
            Unit::Seconds,
            m.duration.clone(),
        );
        r.register_with_unit(
            "connect_latency",
            "Time to connect to an endpoint",
            Unit::Seconds,
            m.connect_latency.clone(),
        );
        r.register("retries", "Tries after a failed connect, or after a retried answer or timeout", m.retries.clone());
        r.register(
            "retry_budget_exhausted",
            "Retries not made because the service's retry budget was spent",
            m.budget_exhausted.clone(),
        );
        r.register(
            "rate_limited",
            "Requests (429) or connections refused by the service's rate limit",
            m.rate_limited.clone(),
        );
        r.register("requests", "Requests whose response ended, by status class or gRPC status", m.requests.clone());
        r.register_with_unit(
            "response_latency",
            "Time from a request to its response's headers",
            Unit::Seconds,
            m.response_latency.clone(),
        );
        r.register("breaker_ejections", "Times an endpoint's breaker opened", m.ejections.clone());
        r.register("tunnel_events", "mTLS tunnel handshakes, streams, TLS failures and denials", m.tunnel.clone());
        r.register("tunnel_tls_failures", "Failed tunnel handshakes by reason", m.tls_failures.clone());
        r.register("outbound_events", "What the outbound listener did with accepted connections", m.outbound.clone());
        r.register("outbound_active_connections", "Forwarded connections open now", m.outbound_active.clone());
        r.register_with_unit(
            "outbound",
            "Bytes the outbound proxy moved, by direction",
            Unit::Bytes,
            m.outbound_bytes.clone(),
        );
        r.register_collector(Box::new(LiveCollector(m.live.clone())));
        r.register("state_generation", "Generation of the accepted state", m.generation.clone());
        r.register("log_lines_dropped", "Log lines dropped because stderr could not keep up", m.log_drops.clone());
        r.register("spans_exported", "Spans of sampled requests the OTLP collector took", m.spans_exported.clone());
        r.register(
            "spans_dropped",
            "Spans dropped: the queue to the collector was full, or their export failed",
            m.spans_dropped.clone(),
        );
        r.register_with_unit("map_sync_duration", "Time to sync the kernel maps", Unit::Seconds, m.map_sync.clone());
        Self { registry: r, ..m }
    }

    pub fn endpoint_series(&self, labels: ConnLabels) -> EndpointSeries {
        let e = labels.endpoint_labels();
        let sketch = self.sketches.lock().unwrap_or_else(|p| p.into_inner()).entry(labels.clone()).or_default().clone();
        EndpointSeries {
            opened: self.opened.get_or_create(&labels).clone(),
            closed: self.closed.get_or_create(&labels).clone(),
            sent: self.bytes_sent.get_or_create(&labels).clone(),
            received: self.bytes_received.get_or_create(&labels).clone(),
            connect_latency: self.connect_latency.get_or_create(&e).clone(),
            ejections: self.ejections.get_or_create(&e).clone(),
            requests: self.requests.clone(),
            by_class: Default::default(),
            latency: sketch.0,
            rate: sketch.1,
            labels,
        }
    }

    pub fn service_series(&self, labels: ServiceLabels) -> ServiceSeries {
        ServiceSeries {
            requests: self.requests.clone(),
            response_latency: self.response_latency.get_or_create(&labels).clone(),
            failed: self.failed.clone(),
            duration: self.duration.get_or_create(&labels).clone(),
            retries: self.retries.get_or_create(&labels).clone(),
            budget_exhausted: self.budget_exhausted.get_or_create(&labels).clone(),
            rate_limited: self.rate_limited.get_or_create(&labels).clone(),
            labels,
        }
    }

    /// Drops the series of an endpoint that left the state, so that label
    /// sets stay bounded by the state, not by its history.
    pub fn forget_endpoint(&self, labels: &ConnLabels) {
        let e = labels.endpoint_labels();
        self.sketches.lock().unwrap_or_else(|p| p.into_inner()).remove(labels);
        for class in REQUEST_CLASSES {
            self.requests.remove(&RequestLabels {
                service: labels.service.clone(),
                endpoint: labels.endpoint.clone(),
                direction: labels.direction,
                class,
            });
        }
        for f in [&self.opened, &self.closed, &self.bytes_sent, &self.bytes_received] {
            f.remove(labels);
        }
        self.connect_latency.remove(&e);
        self.ejections.remove(&e);
    }

    /// Drops the series of a service port that left the state.
    pub fn forget_service(&self, labels: &ServiceLabels) {
        self.response_latency.remove(labels);
        for class in REQUEST_CLASSES {
            let l = RequestLabels {
                service: labels.service.clone(),
                endpoint: String::new(),
                direction: labels.direction,
                class,
            };
            self.requests.remove(&l);
        }
        for reason in FAILURE_REASONS {
            self.failed.remove(&FailedLabels { service: labels.service.clone(), direction: labels.direction, reason });
        }
        self.duration.remove(labels);
        self.retries.remove(labels);
        self.budget_exhausted.remove(labels);
        self.rate_limited.remove(labels);
    }

    /// Reads the kernel's counters and the endpoints' state from `live`
    /// at every scrape.
    pub fn serve_live(&self, live: Arc<dyn Live>) {
        let _ = self.live.set(live);
    }

    /// Reports the log lines `counter` counts as dropped.
    pub fn watch_log_drops(&self, counter: super::logwriter::DroppedLines) {
        let _ = self.log_drop_source.set(counter);
    }

    /// The Prometheus text exposition format (0.0.4), which Prometheus and
    /// promtool read: prometheus-client writes OpenMetrics, so counter
    /// families get their `_total` sample name in HELP and TYPE, and the
    /// `# UNIT` and `# EOF` lines go.
    pub fn encode(&self) -> String {
        if let Some(c) = self.log_drop_source.get() {
            let (have, now) = (self.log_drops.get(), c.get());
            if now > have {
                self.log_drops.inc_by(now - have);
            }
        }
        let mut open = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut open, &self.registry);
        to_prometheus_text(&open)
    }
}

fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> =
        openmetrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests;
