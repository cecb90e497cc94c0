//! Prometheus metrics (prometheus-client), all prefixed `mesh_`. Labels are
//! bounded: service, endpoint (from the state), direction, reason; never a
//! client port or anything per connection.

use std::sync::atomic::AtomicU64;

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

type FloatGauge = Gauge<f64, AtomicU64>;

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
}

/// One service port's series, looked up once per state.
#[derive(Clone, Debug)]
pub struct ServiceSeries {
    pub labels: ServiceLabels,
    pub failed: Counter,
    pub duration: Histogram,
    pub retries: Counter,
}

fn duration_family() -> Family<ServiceLabels, Histogram, fn() -> Histogram> {
    fn ctor() -> Histogram {
        Histogram::new(exponential_buckets(0.001, 2.0, 16))
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
    pub failed: Family<ServiceLabels, Counter>,
    pub bytes_sent: Family<ConnLabels, Counter>,
    pub bytes_received: Family<ConnLabels, Counter>,
    pub duration: Family<ServiceLabels, Histogram, fn() -> Histogram>,
    pub connect_latency: Family<EndpointLabels, Histogram, fn() -> Histogram>,
    pub retries: Family<ServiceLabels, Counter>,
    pub ejections: Family<EndpointLabels, Counter>,
    pub healthy: Family<EndpointLabels, Gauge>,
    pub effective_weight: Family<EndpointLabels, Gauge>,
    pub ewma_rtt: Family<EndpointLabels, FloatGauge>,
    pub tunnel: Family<CounterLabels, Counter>,
    pub tls_failures: Family<ReasonLabels, Counter>,
    pub kernel: Family<CounterLabels, Counter>,
    pub generation: Gauge,
    log_drops: Counter,
    log_drop_source: std::sync::OnceLock<super::logwriter::DroppedLines>,
    pub map_sync: Histogram,
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
            connect_latency: latency_family(),
            retries: Family::default(),
            ejections: Family::default(),
            healthy: Family::default(),
            effective_weight: Family::default(),
            ewma_rtt: Family::default(),
            tunnel: Family::default(),
            tls_failures: Family::default(),
            kernel: Family::default(),
            generation: Gauge::default(),
            log_drops: Counter::default(),
            log_drop_source: std::sync::OnceLock::new(),
            map_sync: Histogram::new(exponential_buckets(0.000_01, 2.0, 16)),
            registry: Registry::default(),
        };
        r.register("connections_opened", "Connections forwarded to an endpoint", m.opened.clone());
        r.register("connections_closed", "Forwarded connections that ended", m.closed.clone());
        r.register("connections_failed", "Connections closed because no endpoint could be reached", m.failed.clone());
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
        r.register("retries", "Connect tries on another endpoint after a failed one", m.retries.clone());
        r.register("breaker_ejections", "Times an endpoint's breaker opened", m.ejections.clone());
        r.register("endpoint_healthy", "1 when the endpoint passes its active checks", m.healthy.clone());
        r.register("endpoint_effective_weight", "Weight the balancer uses now", m.effective_weight.clone());
        r.register_with_unit("endpoint_ewma_rtt", "Peak-EWMA of connect time", Unit::Seconds, m.ewma_rtt.clone());
        r.register("tunnel_events", "mTLS tunnel handshakes, streams, TLS failures and denials", m.tunnel.clone());
        r.register("tunnel_tls_failures", "Failed tunnel handshakes by reason", m.tls_failures.clone());
        r.register("kernel_events", "Counters of the kernel programs (STATS map)", m.kernel.clone());
        r.register("state_generation", "Generation of the accepted state", m.generation.clone());
        r.register("log_lines_dropped", "Log lines dropped because stderr could not keep up", m.log_drops.clone());
        r.register_with_unit("map_sync_duration", "Time to sync the kernel maps", Unit::Seconds, m.map_sync.clone());
        Self { registry: r, ..m }
    }

    pub fn endpoint_series(&self, labels: ConnLabels) -> EndpointSeries {
        let e = labels.endpoint_labels();
        EndpointSeries {
            opened: self.opened.get_or_create(&labels).clone(),
            closed: self.closed.get_or_create(&labels).clone(),
            sent: self.bytes_sent.get_or_create(&labels).clone(),
            received: self.bytes_received.get_or_create(&labels).clone(),
            connect_latency: self.connect_latency.get_or_create(&e).clone(),
            ejections: self.ejections.get_or_create(&e).clone(),
            labels,
        }
    }

    pub fn service_series(&self, labels: ServiceLabels) -> ServiceSeries {
        ServiceSeries {
            failed: self.failed.get_or_create(&labels).clone(),
            duration: self.duration.get_or_create(&labels).clone(),
            retries: self.retries.get_or_create(&labels).clone(),
            labels,
        }
    }

    /// Drops the series of an endpoint that left the state, so that label
    /// sets stay bounded by the state, not by its history.
    pub fn forget_endpoint(&self, labels: &ConnLabels) {
        let e = labels.endpoint_labels();
        for f in [&self.opened, &self.closed, &self.bytes_sent, &self.bytes_received] {
            f.remove(labels);
        }
        self.connect_latency.remove(&e);
        self.ejections.remove(&e);
    }

    /// Drops the series of a service port that left the state.
    pub fn forget_service(&self, labels: &ServiceLabels) {
        self.failed.remove(labels);
        self.duration.remove(labels);
        self.retries.remove(labels);
    }

    /// Brings a counter that mirrors an absolute value (kernel or tunnel
    /// counters) up to `value`.
    pub fn mirror(family: &Family<CounterLabels, Counter>, counter: &'static str, value: u64) {
        let c = family.get_or_create(&CounterLabels { counter });
        let have = c.get();
        if value > have {
            c.inc_by(value - have);
        }
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
mod tests {
    use super::*;

    #[test]
    fn counters_get_their_total_name_and_openmetrics_lines_go() {
        let m = Metrics::new();
        m.retries.get_or_create(&ServiceLabels { service: "default/web:80".into(), direction: "outbound" }).inc();
        let text = m.encode();
        assert!(text.contains("# HELP mesh_retries_total "), "{text}");
        assert!(text.contains("# TYPE mesh_retries_total counter"), "{text}");
        assert!(text.contains("mesh_retries_total{service=\"default/web:80\",direction=\"outbound\"} 1"), "{text}");
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"), "{text}");
        assert!(text.contains("# TYPE mesh_state_generation gauge"), "{text}");
    }
}
