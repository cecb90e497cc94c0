//! What `meshctl stats` shows of the series: rows, latency quantiles
//! from a sketch, and the recent request rate.

use super::*;

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
    /// The latency sketch's counts (see [`LatencySketch::quantile_of`]),
    /// only when asked for (`GET /v1/stats?buckets=true`): what `meshctl
    /// top` takes quantiles of an interval from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub latency_buckets: Vec<u64>,
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
            latency_buckets: Vec::new(),
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
            latency_buckets: self.latency.counts(),
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

/// One route rule's series: its requests by outcome, their recent rate,
/// and the latency of their answers (a Prometheus histogram, and a sketch
/// for `meshctl top`).
#[derive(Debug)]
pub struct RuleSeries {
    labels: RuleLabels,
    latency_histogram: Histogram,
    latency: LatencySketch,
    rate: RecentRate,
    requests: AtomicU64,
    ok: AtomicU64,
}

impl RuleSeries {
    pub(super) fn new(latency_histogram: Histogram, labels: RuleLabels) -> Self {
        Self {
            labels,
            latency_histogram,
            latency: LatencySketch::default(),
            rate: RecentRate::default(),
            requests: AtomicU64::new(0),
            ok: AtomicU64::new(0),
        }
    }

    /// The answer's head came (from a backend, or the proxy) `d` after
    /// the request.
    pub fn answered(&self, d: std::time::Duration) {
        self.latency_histogram.observe(d.as_secs_f64());
        self.latency.observe(d);
    }

    /// A request it decided ended, in `class`, at second `secs`
    /// ([`crate::env::secs_at`]).
    pub fn finished(&self, class: &str, secs: u64) {
        self.rate.record(secs);
        self.requests.fetch_add(1, Ordering::Relaxed);
        if succeeded(class) {
            self.ok.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(super) fn row(&self) -> RouteStatsRow {
        let requests = self.requests.load(Ordering::Relaxed);
        RouteStatsRow {
            route: self.labels.route.to_string(),
            rule: self.labels.rule.to_string(),
            requests,
            success_rate: (requests > 0).then(|| self.ok.load(Ordering::Relaxed) as f64 / requests as f64),
            rate_per_second: (requests > 0).then(|| self.rate.per_second(now_secs())),
            p50_ms: self.latency.quantile_ms(0.5),
            p99_ms: self.latency.quantile_ms(0.99),
            latency_buckets: self.latency.counts(),
        }
    }
}

/// One route rule's row (`GET /v1/stats/routes`, `meshctl top`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteStatsRow {
    /// `namespace/name` of the route.
    pub route: String,
    /// The rule's `name`, else its index.
    pub rule: String,
    /// Requests it decided that ended.
    pub requests: u64,
    /// Of those, the share that succeeded (HTTP below 500, gRPC OK).
    pub success_rate: Option<f64>,
    /// Requests per second over the last [`RATE_WINDOW_SECS`] seconds.
    pub rate_per_second: Option<f64>,
    /// Answer latency quantiles, to within 25%.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// The latency sketch's counts.
    pub latency_buckets: Vec<u64>,
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
        Self::quantile_of(&self.counts(), q)
    }

    /// The counts of the buckets, as [`StatsRow::latency_buckets`] carries
    /// them.
    pub fn counts(&self) -> Vec<u64> {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect()
    }

    /// The `q` quantile (0..1) in milliseconds of a sketch's `counts`, or
    /// of the difference of two (an interval's requests), to within 25%.
    /// None when they hold nothing.
    pub fn quantile_of(counts: &[u64], q: f64) -> Option<f64> {
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
pub(super) type Recent = (Arc<LatencySketch>, Arc<RecentRate>);

/// Seconds the request rate of `meshctl stats` is taken over.
pub const RATE_WINDOW_SECS: u64 = 10;

/// [`crate::env::process_secs`] in whole seconds: the clock of
/// [`RecentRate`].
pub fn now_secs() -> u64 {
    crate::env::process_secs() as u64
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
