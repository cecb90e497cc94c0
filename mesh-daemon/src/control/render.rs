//! What the control plane shows: metrics, endpoint rows, `meshctl stats`
//! rows, and the kernel maps read through their own handles.

use super::*;

/// One endpoint of one service, as `meshctl get endpoints` and the
/// metrics show it.
#[derive(Debug, Clone)]
pub struct EndpointRow {
    pub service: String,
    pub ip: IpAddr,
    pub node: NodeName,
    pub weight: u16,
    pub effective_weight: u16,
    pub priority: u8,
    pub view: crate::balance::EndpointView,
}

/// What a scrape reads from a running [`Control`] (weakly held: the
/// metrics outlive no daemon).
pub struct LiveView(pub std::sync::Weak<Control>);

impl Live for LiveView {
    fn kernel(&self) -> Vec<(&'static str, u64)> {
        let Some(c) = self.0.upgrade() else { return Vec::new() };
        c.kernel_stats().map(|v| v.into_iter().map(|(s, n)| (s.name(), n)).collect()).unwrap_or_default()
    }

    fn endpoints(&self) -> Vec<EndpointGauges> {
        let Some(c) = self.0.upgrade() else { return Vec::new() };
        c.endpoint_rows()
            .into_iter()
            .map(|r| EndpointGauges {
                service: r.service,
                endpoint: r.ip.to_string(),
                healthy: r.view.active == "healthy",
                effective_weight: r.effective_weight,
                ewma_rtt: std::time::Duration::from_secs_f64(r.view.ewma_rtt_ms / 1000.0),
            })
            .collect()
    }

    fn maps(&self) -> Vec<MapFill> {
        self.0.upgrade().map(|c| c.map_fill()).unwrap_or_default()
    }

    fn ready(&self) -> bool {
        self.0.upgrade().is_some_and(|c| c.readiness().is_ok())
    }
}

impl Control {
    /// The maps the published state fills on this node, against what they
    /// hold (as a write's plan checks them).
    pub fn map_fill(&self) -> Vec<MapFill> {
        let published = self.published.load();
        let needs = crate::model::MapNeeds::of(&published.state, &self.cfg.node, self.cfg.slot_table_size);
        let cap = self.capacity();
        let fill =
            |map, entries: usize, capacity: usize| MapFill { map, entries: entries as u64, capacity: capacity as u64 };
        vec![
            fill(mesh_common::map_names::WORKLOADS, needs.workloads, cap.workloads),
            fill(mesh_common::map_names::SERVICES, needs.services, cap.services),
            fill(mesh_common::map_names::SLOTS, needs.slots, cap.slots),
        ]
    }

    /// `/metrics`: nothing is copied or waited for; the kernel's counters
    /// and the endpoints' state are read during the encoding (see
    /// [`LiveView`]).
    pub fn render_metrics(&self) -> String {
        self.cfg.metrics.encode()
    }

    /// Every endpoint with its configured and effective weight, priority,
    /// health, latency estimate and connections in flight.
    pub fn endpoint_rows(&self) -> Vec<EndpointRow> {
        let published = self.published.load();
        let state = &published.state;
        let now = Instant::now();
        let mut out = Vec::new();
        for s in &state.services {
            let Some(port) = s.ports.first() else {
                continue;
            };
            let states: Vec<_> = s.endpoints.iter().map(|e| self.registry.get(e.addr(port.target_port))).collect();
            let members: Vec<_> = s.endpoints.iter().zip(&states).collect();
            let effective = balance::effective_weights(&members, s.fail_open, |(e, st)| Candidate {
                weight: e.weight.0,
                priority: e.priority,
                available: match s.mode {
                    Mode::Kernel => st.actively_healthy(),
                    Mode::Proxy => st.available(now),
                },
            });
            for ((e, st), effective_weight) in s.endpoints.iter().zip(&states).zip(effective) {
                out.push(EndpointRow {
                    service: s.key().to_string(),
                    ip: e.ip,
                    node: e.node.clone(),
                    weight: e.weight.0,
                    effective_weight,
                    priority: e.priority,
                    view: st.view(now),
                });
            }
        }
        out
    }

    /// `meshctl stats`: per service port and endpoint, outbound then
    /// inbound, from the series the proxy counts into.
    pub fn stats_rows(&self) -> Vec<StatsRow> {
        self.views.iter().flat_map(|v| v.stats_rows()).collect()
    }

    /// `meshctl top`'s route rows: each route rule that decided a request.
    pub fn route_rows(&self) -> Vec<crate::telemetry::metrics::RouteStatsRow> {
        self.cfg.metrics.route_rows()
    }

    /// [`Control::endpoint_rows`] as the API shows them.
    pub fn endpoints(&self) -> Vec<Value> {
        self.endpoint_rows()
            .into_iter()
            .map(|r| {
                json!({
                    "service": r.service,
                    "ip": r.ip.to_string(),
                    "node": r.node.as_str(),
                    "weight": r.weight,
                    "effectiveWeight": r.effective_weight,
                    "priority": r.priority,
                    "health": r.view.active,
                    "breaker": r.view.breaker,
                    "reason": r.view.reason,
                    "sinceChangeSeconds": r.view.since_change_s,
                    "ewmaRttMs": r.view.ewma_rtt_ms,
                    "inFlight": r.view.in_flight,
                })
            })
            .collect()
    }

    pub(super) fn view(&self) -> Result<&MapsView, MapsError> {
        self.view.get().ok_or(MapsError::NotAttached)
    }

    /// Every entry of the maps: walks them all, so call it off the async
    /// workers.
    pub fn dump(&self) -> Result<Dump, MapsError> {
        Ok(self.view()?.dump()?)
    }

    pub fn datapath_reused(&self) -> bool {
        self.reused.load(Ordering::Relaxed)
    }

    pub fn kernel_stats(&self) -> Result<Vec<(mesh_common::Stat, u64)>, MapsError> {
        Ok(self.view()?.stats()?)
    }
}
