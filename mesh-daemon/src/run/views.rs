//! What the admin endpoint reads from the running daemon.

use std::sync::Arc;

use crate::control::Control;
use crate::proxy::ProxyCounters;
use crate::telemetry::admin;
use crate::tunnel::TunnelCounters;

/// What the admin endpoint shows.
pub struct AdminView {
    pub control: Arc<Control>,
    pub counters: Arc<ProxyCounters>,
    pub tunnel: Arc<TunnelCounters>,
}

impl admin::AdminSource for AdminView {
    fn readiness(&self) -> Result<(), admin::NotReady> {
        self.control.readiness()
    }

    fn stats_json(&self) -> serde_json::Value {
        let kernel: serde_json::Map<String, serde_json::Value> = match self.control.kernel_stats() {
            Ok(stats) => stats.into_iter().map(|(s, v)| (s.name().to_owned(), v.into())).collect(),
            Err(e) => [("error".to_owned(), e.to_string().into())].into_iter().collect(),
        };
        serde_json::json!({ "proxy": self.counters.snapshot(), "kernel": kernel, "tunnel": self.tunnel.snapshot() })
    }

    fn metrics(&self) -> String {
        self.control.render_metrics()
    }

    fn config_dump(&self) -> serde_json::Value {
        let s = self.control.snapshot();
        serde_json::json!({ "generation": s.generation, "state": s.state })
    }
}

/// The certificates a scrape shows (weakly held).
pub struct CertView(pub std::sync::Weak<crate::identity::manager::Certs>);

impl crate::telemetry::metrics::Certificates for CertView {
    fn certificates(&self) -> Vec<crate::telemetry::metrics::CertificateTimes> {
        let Some(c) = self.0.upgrade() else { return Vec::new() };
        c.validity()
            .into_iter()
            .map(|(kind, not_before, not_after)| crate::telemetry::metrics::CertificateTimes {
                kind,
                not_before,
                not_after,
            })
            .collect()
    }
}
