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

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

mod labels;
pub use labels::*;

/// Every `reason` a failed connection or request can have (the connect
/// error's reasons, and a request's `no_route` and `no_backend`); series
/// are dropped by these when a service goes, and `meshctl stats` sums
/// them. The troubleshooting guide lists each (a test checks).
pub const FAILURE_REASONS: [&str; 16] = [
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
    "bad_request",
    "no_route",
    "no_backend",
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

/// How full one kernel map is with the accepted state.
#[derive(Clone, Debug, PartialEq)]
pub struct MapFill {
    pub map: &'static str,
    /// Entries the accepted state needs on this node.
    pub entries: u64,
    /// Entries the map holds.
    pub capacity: u64,
}

/// What a scrape reads from the running daemon.
pub trait Live: Send + Sync + 'static {
    /// The kernel programs' counters (the STATS map), by name.
    fn kernel(&self) -> Vec<(&'static str, u64)>;
    fn endpoints(&self) -> Vec<EndpointGauges>;
    /// The maps the state fills, against their capacity.
    fn maps(&self) -> Vec<MapFill>;
    /// What the readiness probe answers now.
    fn ready(&self) -> bool;
}

/// One certificate this daemon holds, as a scrape shows it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CertificateTimes {
    /// `node` (served by the tunnel) or `workload` (presented for a pod).
    pub kind: &'static str,
    pub not_before: std::time::SystemTime,
    pub not_after: std::time::SystemTime,
}

/// The certificates a scrape reads (only a daemon with the mTLS tunnel
/// holds any).
pub trait Certificates: Send + Sync + 'static {
    fn certificates(&self) -> Vec<CertificateTimes>;
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
        let maps = live.maps();
        let mut family = encoder.encode_descriptor(
            "map_entries",
            "Entries the accepted state needs in a kernel map on this node",
            None,
            MetricType::Gauge,
        )?;
        for m in &maps {
            ConstGauge::new(m.entries as i64).encode(family.encode_family(&MapLabels { map: m.map })?)?;
        }
        let mut family =
            encoder.encode_descriptor("map_capacity", "Entries a kernel map holds", None, MetricType::Gauge)?;
        for m in &maps {
            ConstGauge::new(m.capacity as i64).encode(family.encode_family(&MapLabels { map: m.map })?)?;
        }
        let family = encoder.encode_descriptor(
            "ready",
            "1 when the daemon is ready (its datapath attached, its state accepted)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(i64::from(live.ready())).encode(family)?;
        Ok(())
    }
}

/// Encodes, for each kind of certificate, the one that expires first.
struct CertificateCollector(Arc<OnceLock<Arc<dyn Certificates>>>);

impl std::fmt::Debug for CertificateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertificateCollector")
    }
}

impl Collector for CertificateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(source) = self.0.get() else { return Ok(()) };
        let mut first: Vec<CertificateTimes> = Vec::new();
        for c in source.certificates() {
            match first.iter_mut().find(|f| f.kind == c.kind) {
                Some(f) if c.not_after < f.not_after => *f = c,
                Some(_) => {}
                None => first.push(c),
            }
        }
        let secs = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        let mut family = encoder.encode_descriptor(
            "certificate_expiry_timestamp_seconds",
            "When the certificate of this kind that expires first expires (Unix time)",
            None,
            MetricType::Gauge,
        )?;
        for c in &first {
            ConstGauge::new(secs(c.not_after)).encode(family.encode_family(&KindLabels { kind: c.kind })?)?;
        }
        let mut family = encoder.encode_descriptor(
            "certificate_issued_timestamp_seconds",
            "When that certificate was issued (Unix time): renewed, it moves forward",
            None,
            MetricType::Gauge,
        )?;
        for c in &first {
            ConstGauge::new(secs(c.not_before)).encode(family.encode_family(&KindLabels { kind: c.kind })?)?;
        }
        Ok(())
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
    /// `secs`: when it ended ([`crate::env::secs_at`]).
    pub fn request(&self, class: &'static str, secs: u64) {
        self.rate.record(secs);
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
        debug_assert!(FAILURE_REASONS.contains(&reason), "{reason} is not in FAILURE_REASONS");
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

fn response_latency_family<L: Clone + std::hash::Hash + Eq>() -> Family<L, Histogram, fn() -> Histogram> {
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

/// The one registry. Each subsystem registers its own series into it
/// ([`Metrics::register`]): the tunnel its events, the outbound proxy its
/// counters, the control plane its generation and sync time, the span
/// exporter its counts. The per-service and per-endpoint series every path
/// counts into, and the live view of the kernel and endpoints, are here.
pub struct Metrics {
    registry: std::sync::Mutex<Registry>,
    /// Names the subsystems registered.
    names: std::sync::Mutex<std::collections::HashSet<String>>,
    pub opened: Family<ConnLabels, Counter>,
    pub closed: Family<ConnLabels, Counter>,
    pub failed: Family<FailedLabels, Counter>,
    pub bytes_sent: Family<ConnLabels, Counter>,
    pub bytes_received: Family<ConnLabels, Counter>,
    pub duration: Family<ServiceLabels, Histogram, fn() -> Histogram>,
    pub requests: Family<RequestLabels, Counter>,
    /// Requests by the route rule that decided them and its backend.
    pub route_requests: Family<RouteLabels, Counter>,
    /// Response latency by route rule.
    route_latency: Family<RuleLabels, Histogram, fn() -> Histogram>,
    /// Each route rule's series, made when it first decides a request.
    rules: std::sync::RwLock<HashMap<RuleLabels, Arc<RuleSeries>>>,
    /// Authorization decisions, by policy.
    pub authz_decisions: Family<AuthzLabels, Counter>,
    pub response_latency: Family<ServiceLabels, Histogram, fn() -> Histogram>,
    pub connect_latency: Family<EndpointLabels, Histogram, fn() -> Histogram>,
    pub retries: Family<ServiceLabels, Counter>,
    pub budget_exhausted: Family<ServiceLabels, Counter>,
    pub rate_limited: Family<ServiceLabels, Counter>,
    pub ejections: Family<EndpointLabels, Counter>,
    /// What a scrape reads from the running daemon (kernel counters,
    /// endpoint state), once it runs.
    live: Arc<OnceLock<Arc<dyn Live>>>,
    /// The certificates a scrape reads, once the daemon holds any.
    certificates: Arc<OnceLock<Arc<dyn Certificates>>>,
    /// The process's own series (`process_*`, not prefixed).
    process: Registry,
    /// Latency sketches by endpoint series, kept across state writes like
    /// the registered families.
    sketches: std::sync::Mutex<HashMap<ConnLabels, Recent>>,
    log_drops: Counter,
    log_drop_source: std::sync::OnceLock<super::logwriter::DroppedLines>,
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
            route_requests: Family::default(),
            route_latency: response_latency_family::<RuleLabels>(),
            rules: Default::default(),
            authz_decisions: Family::default(),
            response_latency: response_latency_family::<ServiceLabels>(),
            connect_latency: latency_family(),
            retries: Family::default(),
            budget_exhausted: Family::default(),
            rate_limited: Family::default(),
            ejections: Family::default(),
            live: Arc::new(OnceLock::new()),
            certificates: Arc::new(OnceLock::new()),
            process: super::process::registry(),
            sketches: std::sync::Mutex::new(HashMap::new()),
            log_drops: Counter::default(),
            log_drop_source: std::sync::OnceLock::new(),
            registry: std::sync::Mutex::new(Registry::default()),
            names: Default::default(),
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
        r.register(
            "route_requests",
            "Requests a route rule decided, by route, rule, backend Service (empty: answered by the proxy) and class",
            m.route_requests.clone(),
        );
        r.register_with_unit(
            "route_response_latency",
            "Time from a request a route rule decided to its response's headers (or the proxy's own answer)",
            Unit::Seconds,
            m.route_latency.clone(),
        );
        r.register(
            "authz_decisions",
            "Authorization decisions by policy, action and decision (policy empty: no ALLOW policy matched)",
            m.authz_decisions.clone(),
        );
        r.register_with_unit(
            "response_latency",
            "Time from a request to its response's headers",
            Unit::Seconds,
            m.response_latency.clone(),
        );
        r.register("breaker_ejections", "Times an endpoint's breaker opened", m.ejections.clone());
        r.register_collector(Box::new(LiveCollector(m.live.clone())));
        r.register_collector(Box::new(CertificateCollector(m.certificates.clone())));
        r.register("log_lines_dropped", "Log lines dropped because stderr could not keep up", m.log_drops.clone());
        Self { registry: std::sync::Mutex::new(r), ..m }
    }

    /// Registers a subsystem's series (`mesh_` is prefixed). A daemon
    /// registers each name once; a name registered again (tests and the
    /// fuzz target make many control planes on one registry) keeps the
    /// first, so the exposition never holds a name twice.
    pub fn register(&self, name: &str, help: &str, metric: impl prometheus_client::registry::Metric) {
        if self.claim(name) {
            self.registry.lock().unwrap_or_else(|p| p.into_inner()).register(name, help, metric);
        }
    }

    /// Whether `name` was not registered yet (and now is).
    fn claim(&self, name: &str) -> bool {
        self.names.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_owned())
    }

    /// [`Metrics::register`] with a unit suffix.
    pub fn register_with_unit(
        &self,
        name: &str,
        help: &str,
        unit: Unit,
        metric: impl prometheus_client::registry::Metric,
    ) {
        if self.claim(name) {
            self.registry.lock().unwrap_or_else(|p| p.into_inner()).register_with_unit(name, help, unit, metric);
        }
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

    /// Drops the series of route rules and backends (route, rule,
    /// backend) that left the state (a rule's own series go with its
    /// backend-less key, which it has while it exists).
    pub fn forget_route_series<'a>(&self, gone: impl Iterator<Item = &'a (Arc<str>, Arc<str>, Arc<str>)>) {
        for (route, rule, backend) in gone {
            if backend.is_empty() {
                let l = RuleLabels { route: route.clone(), rule: rule.clone() };
                self.rules.write().unwrap_or_else(|p| p.into_inner()).remove(&l);
                self.route_latency.remove(&l);
            }
            for class in REQUEST_CLASSES {
                let l = RouteLabels { route: route.clone(), rule: rule.clone(), backend: backend.clone(), class };
                self.route_requests.remove(&l);
            }
        }
    }

    /// The series of rule `rule` of route `route` (made on its first
    /// request): what a request it decides is counted into.
    pub fn rule_series(&self, route: &Arc<str>, rule: &Arc<str>) -> Arc<RuleSeries> {
        let l = RuleLabels { route: route.clone(), rule: rule.clone() };
        if let Some(s) = self.rules.read().unwrap_or_else(|p| p.into_inner()).get(&l) {
            return s.clone();
        }
        let mut rules = self.rules.write().unwrap_or_else(|p| p.into_inner());
        rules
            .entry(l.clone())
            .or_insert_with(|| Arc::new(RuleSeries::new(self.route_latency.get_or_create(&l).clone(), l)))
            .clone()
    }

    /// A row per route rule that decided a request, by route and rule.
    pub fn route_rows(&self) -> Vec<RouteStatsRow> {
        let mut rows: Vec<RouteStatsRow> =
            self.rules.read().unwrap_or_else(|p| p.into_inner()).values().map(|s| s.row()).collect();
        rows.sort_by(|a, b| (&a.route, &a.rule).cmp(&(&b.route, &b.rule)));
        rows
    }

    /// Reads the kernel's counters and the endpoints' state from `live`
    /// at every scrape.
    pub fn serve_live(&self, live: Arc<dyn Live>) {
        let _ = self.live.set(live);
    }

    /// One series of each of the families this registry holds, with
    /// placeholder labels: what the metrics reference page is generated
    /// from (`mesh-daemon reference metrics`).
    pub fn example_series(&self) {
        let service = || String::from("NAMESPACE/NAME:PORT");
        let conn = ConnLabels { service: service(), endpoint: "IP:PORT".into(), direction: "outbound" };
        self.endpoint_series(conn).request("2xx", now_secs());
        self.service_series(ServiceLabels { service: service(), direction: "outbound" }).failed("refused");
        let route = |s: &str| Arc::<str>::from(s);
        let r = RouteLabels { route: route("NAMESPACE/ROUTE"), rule: route("RULE"), backend: route(""), class: "2xx" };
        let _ = self.route_requests.get_or_create(&r);
        self.rule_series(&r.route, &r.rule).answered(std::time::Duration::ZERO);
        let a = AuthzLabels { policy: route("NAMESPACE/POLICY"), action: "ALLOW", decision: "allow" };
        let _ = self.authz_decisions.get_or_create(&a);
    }

    /// Reads the certificates' times from `source` at every scrape.
    pub fn watch_certificates(&self, source: Arc<dyn Certificates>) {
        let _ = self.certificates.set(source);
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
        let _ = prometheus_client::encoding::text::encode_registry(
            &mut open,
            &self.registry.lock().unwrap_or_else(|p| p.into_inner()),
        );
        let _ = prometheus_client::encoding::text::encode(&mut open, &self.process);
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

mod stats;
pub use stats::*;

#[cfg(test)]
mod tests;
