//! What the proxy needs from the state, indexed for the accept path: the
//! service port behind each kernel service id, its endpoints with their
//! shared state, and the workloads by IP. [`view::RoutesView`] keeps it
//! current.

mod view;
pub use view::RoutesView;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::proxy::http::policy::{Policies, Policy, RetryBudget};
use tokio::time::Instant;

use crate::balance::{self, EndpointState, Member, Registry};
use crate::env::Env;
use crate::identity::Identity;
use crate::model::route::{Router, Rule};
use crate::model::{AppProtocol, Delta, Family, Frontend, NodeName, PortKey, Snapshot, State};
use crate::shared_map::SharedMap;
use crate::telemetry::metrics::{
    ConnLabels, EndpointSeries, RouteLabels, RuleSeries, ServiceLabels, ServiceSeries, StatsRow, REQUEST_CLASSES,
};
use crate::telemetry::Metrics;
use prometheus_client::metrics::counter::Counter;

#[derive(Debug)]
pub struct RouteEndpoint {
    pub state: Arc<EndpointState>,
    pub weight: u16,
    pub priority: u8,
    /// On another node: that node and its tunnel address.
    pub remote: Option<(NodeName, SocketAddr)>,
    /// Its metric series, made when it first carries a connection (as
    /// linkerd2-proxy does): an endpoint that never does costs no series.
    series: OnceLock<Box<EndpointSeries>>,
    /// Its route's name and the metrics, to make `series` from.
    source: Arc<SeriesSource>,
}

/// What a route's lazily made series come from.
struct SeriesSource {
    name: String,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for SeriesSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

impl RouteEndpoint {
    /// Its series, made on first use.
    pub fn series(&self) -> &EndpointSeries {
        self.series.get_or_init(|| {
            Box::new(self.source.metrics.endpoint_series(ConnLabels {
                service: self.source.name.clone(),
                endpoint: self.state.addr.to_string(),
                direction: "outbound",
            }))
        })
    }

    /// `local` or the node's name, for the access log.
    pub fn node(&self) -> &str {
        self.remote.as_ref().map_or("local", |(n, _)| n.as_str())
    }
}

#[derive(Debug)]
pub struct Route {
    /// The service port it routes: its policy and series belong to it.
    pub key: PortKey,
    /// The family of the VIP it serves; its endpoints are of it too.
    pub family: Family,
    /// `namespace/name:port`: the key as logs and metrics write it.
    pub name: String,
    pub endpoints: Vec<RouteEndpoint>,
    pub fail_open: bool,
    pub connect_timeout: Duration,
    pub retries: u32,
    pub retry_budget: Duration,
    /// Cross-node connections go through the mTLS tunnel.
    pub mtls: bool,
    /// Bytes, or requests routed one by one.
    pub app_protocol: AppProtocol,
    /// Which of its connections and requests the access log writes.
    pub access_log: crate::model::AccessLog,
    /// Made on first use, like the endpoints'.
    series: OnceLock<Box<ServiceSeries>>,
    source: Arc<SeriesSource>,
    /// Per request: timeouts, retries, outlier ejection, rate limit (the
    /// rate limit applies to connections of `tcp` ports too).
    pub policy: Arc<Policy>,
    /// The retry budget of retries a route rule asks for (`retry`) when
    /// the service's own policy keeps none; made on first use.
    routed_budget: OnceLock<RetryBudget>,
    /// The routes (Gateway API) attached to this service port, if any:
    /// its requests are decided by them (see [`crate::proxy::http::router`]).
    pub router: Option<Arc<Router>>,
    /// What each rule of `router` counts its requests into, by rule index:
    /// made on a rule's first request, then a request touches atomics.
    meters: Box<[OnceLock<Arc<RuleMeter>>]>,
    /// The service, frontend and router it was made from: a later state
    /// with the same `Arc`s and frontend keeps the route as it is.
    from: (Arc<crate::model::Service>, Frontend),
}

impl Route {
    /// The retry budget for a request here: the service's own, or for a
    /// request whose route rule retries, one made for those.
    pub fn retry_budget(&self, routed_retry: bool) -> Option<&RetryBudget> {
        match &self.policy.budget {
            Some(b) => Some(b),
            None if routed_retry => Some(self.routed_budget.get_or_init(|| RetryBudget::new(Default::default()))),
            None => None,
        }
    }

    /// Its series, made on first use.
    /// The metrics its series count into.
    pub fn metrics(&self) -> &crate::telemetry::metrics::Metrics {
        &self.source.metrics
    }

    /// The meter of rule `rule` of its router (None: it has no such rule).
    pub fn rule_meter(&self, rule: usize) -> Option<Arc<RuleMeter>> {
        let (router, cell) = (self.router.as_ref()?, self.meters.get(rule)?);
        let meter = cell.get_or_init(|| {
            let r = router.rules[rule].clone();
            let series = self.source.metrics.rule_series(&r.label, &r.name);
            let requests = (0..=r.backends.len()).map(|_| Default::default()).collect();
            Arc::new(RuleMeter { rule: r, series, requests, metrics: self.source.metrics.clone() })
        });
        Some(meter.clone())
    }

    pub fn series(&self) -> &ServiceSeries {
        self.series.get_or_init(|| {
            Box::new(
                self.source
                    .metrics
                    .service_series(ServiceLabels { service: self.source.name.clone(), direction: "outbound" }),
            )
        })
    }
}

impl Route {
    /// The route of frontend `f` of `state`.
    fn new(
        state: &State,
        f: &Frontend,
        registry: &Registry,
        policies: &Policies,
        local: &Local,
        metrics: &Arc<Metrics>,
    ) -> Self {
        let s = &state.services[f.service];
        let key = PortKey { service: s.key(), port: f.port.0 };
        let name = key.to_string();
        let source = Arc::new(SeriesSource { name: name.clone(), metrics: metrics.clone() });
        let here = state.node(&local.node).map(|n| n.addresses).unwrap_or_default();
        let endpoints = s
            .endpoints_of(f.family())
            .map(|(_, e)| {
                let addr = e.addr(f.target_port);
                let remote = (e.node != local.node)
                    .then(|| {
                        let n = state.node(&e.node)?;
                        Some((e.node.clone(), SocketAddr::new(tunnel_address(&here, n), local.tunnel_port)))
                    })
                    .flatten();
                RouteEndpoint {
                    state: registry.get(addr),
                    weight: e.weight.0,
                    priority: e.priority,
                    remote,
                    series: OnceLock::new(),
                    source: source.clone(),
                }
            })
            .collect();
        let router = state.routes.router(&key.service).filter(|r| r.takes(key.port)).cloned();
        let meters = router.as_ref().map_or(0, |r| r.rules.len());
        Route {
            router,
            meters: (0..meters).map(|_| OnceLock::new()).collect(),
            series: OnceLock::new(),
            source,
            policy: policies.get(&key, &s.http),
            routed_budget: OnceLock::new(),
            key,
            family: f.family(),
            name,
            endpoints,
            fail_open: s.fail_open,
            connect_timeout: s.connect_timeout,
            retries: s.retries,
            retry_budget: s.retry_budget,
            mtls: s.mtls,
            app_protocol: f.app_protocol,
            access_log: s.access_log,
            from: (s.clone(), f.clone()),
        }
    }

    /// Whether it is the route of `f` in `state` as it is.
    fn built_from(&self, state: &State, f: &Frontend) -> bool {
        let (service, front) = &self.from;
        let routes = &state.routes;
        let router = (!routes.by_parent.is_empty())
            .then(|| routes.router(&service.key()).filter(|r| r.takes(f.port.0)))
            .flatten();
        Arc::ptr_eq(service, &state.services[f.service])
            && match (&self.router, router) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (a, b) => a.is_none() && b.is_none(),
            }
            && (front.vip, front.port, front.target_port, front.app_protocol)
                == (f.vip, f.port, f.target_port, f.app_protocol)
    }

    /// Takes over the series `old` (the same route before a write) made,
    /// so counts go on across writes without making series for endpoints
    /// that carry nothing.
    fn adopt_series(&self, old: &Route) {
        if std::ptr::eq(self, old) {
            return;
        }
        if let Some(s) = old.series.get() {
            let _ = self.series.set(s.clone());
        }
        if old.endpoints.iter().all(|e| e.series.get().is_none()) {
            return;
        }
        let made: HashMap<SocketAddr, &EndpointSeries> =
            old.endpoints.iter().filter_map(|e| Some((e.state.addr, e.series.get()?.as_ref()))).collect();
        for e in &self.endpoints {
            if let Some(s) = made.get(&e.state.addr) {
                let _ = e.series.set(Box::new((*s).clone()));
            }
        }
    }

    /// Drops the series this route made that `next` (the same route after
    /// a write, if it stays) has not; the service port's own series only
    /// when no route of it stays (`port_stays`: one of the other family).
    fn forget_series_missing_from(&self, next: Option<&Route>, port_stays: bool, metrics: &Metrics) {
        if next.is_some_and(|n| std::ptr::eq(self, n)) {
            return;
        }
        if let (Some(s), false) = (self.series.get(), port_stays) {
            metrics.forget_service(&s.labels);
        }
        for e in &self.endpoints {
            let Some(s) = e.series.get() else { continue };
            if !next.is_some_and(|k| k.endpoints.iter().any(|n| n.state.addr == e.state.addr)) {
                metrics.forget_endpoint(&s.labels);
            }
        }
    }
}

/// What the requests one route rule decides are counted into: the rule's
/// own series and its `mesh_route_requests_total` counters, each looked
/// up once per state.
pub struct RuleMeter {
    pub rule: Arc<Rule>,
    pub series: Arc<RuleSeries>,
    /// By index into `rule.backends` (the last: no backend, the proxy
    /// answered), then by [`REQUEST_CLASSES`] index.
    requests: Box<[[OnceLock<Counter>; REQUEST_CLASSES.len()]]>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for RuleMeter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.rule.label, self.rule.name)
    }
}

impl RuleMeter {
    /// A request the rule sent to `backend` (an index into its backends;
    /// None: answered by the proxy) ended in `class`.
    pub fn finished(&self, backend: Option<usize>, class: &'static str, secs: u64) {
        self.series.finished(class, secs);
        let b = backend.filter(|b| *b < self.rule.backends.len()).unwrap_or(self.rule.backends.len());
        let Some(c) = REQUEST_CLASSES.iter().position(|c| *c == class) else { return };
        self.requests[b][c]
            .get_or_init(|| {
                let labels = RouteLabels {
                    route: self.rule.label.clone(),
                    rule: self.rule.name.clone(),
                    backend: backend
                        .and_then(|b| self.rule.backends.get(b))
                        .map_or_else(|| Arc::from(""), |b| b.label.clone()),
                    class,
                };
                self.metrics.route_requests.get_or_create(&labels).clone()
            })
            .inc();
    }
}

impl Member for RouteEndpoint {
    fn weight(&self) -> u16 {
        self.weight
    }
    fn priority(&self) -> u8 {
        self.priority
    }
    fn state(&self) -> &EndpointState {
        &self.state
    }
}

impl Route {
    /// The endpoint for a new connection (see [`crate::balance::pick`]),
    /// leaving out `tried`; claims the breaker's probe if one is due.
    #[cfg(test)]
    pub fn pick(&self, tried: &[SocketAddr], env: &dyn Env) -> Option<&RouteEndpoint> {
        self.pick_index(tried, env).map(|i| &self.endpoints[i])
    }

    /// The endpoint for a new connection or request (see
    /// [`crate::balance::pick`]), leaving out `tried`, as an index into
    /// `endpoints`; claims the breaker's probe if one is due.
    pub fn pick_index(&self, tried: &[SocketAddr], env: &dyn Env) -> Option<usize> {
        self.pick_index_at(tried, env.now(), env)
    }

    /// [`Route::pick_index`] as of `now`, which the caller has read.
    pub fn pick_index_at(&self, tried: &[SocketAddr], now: Instant, env: &dyn Env) -> Option<usize> {
        balance::pick(&self.endpoints, self.fail_open, tried, now, || env.unit())
    }

    /// Whether one more endpoint may be ejected by its answers: at most
    /// the policy's share of the endpoints is out at once, and one always
    /// may be.
    pub fn may_eject(&self, now: Instant) -> bool {
        let Some(o) = &self.policy.cfg.outlier else { return false };
        let out = self.endpoints.iter().filter(|e| !e.state.available(now)).count();
        let cap = (self.endpoints.len() * o.max_ejected_percent as usize / 100).max(1);
        out < cap
    }
}

/// Where the node proxy is and how it names identities.
#[derive(Debug, Clone)]
pub struct Local {
    pub node: NodeName,
    pub trust_domain: String,
    pub tunnel_port: u16,
}

/// The address of `node` the tunnel from a node with addresses `here`
/// dials: of a family both nodes have, IPv4 first; with none shared (or
/// `here` not known yet), its first.
pub fn tunnel_address(here: &crate::model::Addresses, node: &crate::model::Node) -> IpAddr {
    let mut shared = node.addresses.iter().filter(|a| here.get(Family::of(*a)).is_some());
    shared.next().unwrap_or(node.addresses.primary())
}

/// A family's place in a service port's ids.
fn slot(family: Family) -> usize {
    match family {
        Family::V4 => 0,
        Family::V6 => 1,
    }
}

/// An enrolled workload, as the proxy names it.
#[derive(Debug)]
pub struct Workload {
    /// `namespace/name`.
    pub name: String,
    /// Its namespace: consumer routes of this namespace apply to it.
    pub namespace: crate::model::Name,
    pub identity: Identity,
}

#[derive(Debug, Default)]
pub struct RouteTable {
    /// Shared with the table before but for the routes a write changed.
    by_id: SharedMap<u32, Arc<Route>>,
    /// The id of each service port's frontend of each family: a routed
    /// request's backend is a service port.
    /// Indexed by [`slot`]: looked up by `&PortKey`, no key made per
    /// request.
    ids: SharedMap<PortKey, [Option<u32>; 2]>,
    /// The generation of the state it was built from.
    generation: u64,
    /// That state's nodes: a route to a remote endpoint names its node's
    /// address.
    nodes: Vec<crate::model::Node>,
    /// Workloads by IP.
    workloads: HashMap<IpAddr, Arc<Workload>>,
    /// The state's routes (Gateway API), for the series of their rules.
    routes: Arc<crate::model::route::Routes>,
    /// The authorization policies, for the connections and requests this
    /// node hands to an endpoint directly.
    guard: Arc<crate::proxy::authz::Guard>,
}

impl RouteTable {
    #[cfg(test)]
    pub fn build(
        state: &Arc<State>,
        frontends: &[Frontend],
        registry: &Registry,
        policies: &Policies,
        local: &Local,
        metrics: &Arc<Metrics>,
    ) -> Self {
        Self::build_from(state, frontends, 1, &RouteTable::default(), registry, policies, local, metrics)
    }

    /// Builds the table of `state`, taking the route of every service port
    /// whose service (the same `Arc`), frontend and the nodes are as `prev`
    /// had them from `prev` as it is.
    #[allow(clippy::too_many_arguments)]
    pub fn build_from(
        state: &Arc<State>,
        frontends: &[Frontend],
        generation: u64,
        prev: &RouteTable,
        registry: &Registry,
        policies: &Policies,
        local: &Local,
        metrics: &Arc<Metrics>,
    ) -> Self {
        let same_nodes = prev.nodes == state.nodes;
        let by_id: SharedMap<u32, Arc<Route>> = frontends
            .iter()
            .map(|f| {
                let kept = prev.by_id.get(&f.id).filter(|r| same_nodes && r.built_from(state, f));
                let route = match kept {
                    Some(r) => r.clone(),
                    None => Arc::new(Route::new(state, f, registry, policies, local, metrics)),
                };
                (f.id, route)
            })
            .collect();
        let mut ids: HashMap<PortKey, [Option<u32>; 2]> = HashMap::new();
        for (id, r) in by_id.iter() {
            ids.entry(r.key.clone()).or_default()[slot(r.family)] = Some(*id);
        }
        let ids = ids.into_iter().collect();
        let workloads = state
            .workloads
            .iter()
            .flat_map(|w| {
                let id = Identity::workload(&local.trust_domain, &w.namespace, &w.service_account);
                let name = format!("{}/{}", w.namespace, w.name);
                let wl = Arc::new(Workload { name, namespace: w.namespace.clone(), identity: id });
                w.ips.iter().map(move |ip| (ip, wl.clone())).collect::<Vec<_>>()
            })
            .collect();
        let guard = Arc::new(crate::proxy::authz::Guard::build(state, &local.trust_domain));
        Self { by_id, ids, generation, nodes: state.nodes.clone(), workloads, routes: state.routes.clone(), guard }
    }

    /// The authorization policies of the table's state.
    pub fn guard(&self) -> &Arc<crate::proxy::authz::Guard> {
        &self.guard
    }

    /// `prev` with the routes `delta` changed (the nodes and workloads
    /// are as they were: a write that changes them comes without delta).
    fn apply(
        prev: &RouteTable,
        snap: &Snapshot,
        delta: &Delta,
        registry: &Registry,
        policies: &Policies,
        local: &Local,
        metrics: &Arc<Metrics>,
    ) -> Self {
        let (mut by_id, mut ids) = (prev.by_id.clone(), prev.ids.clone());
        for id in &delta.removed {
            if let Some(r) = by_id.remove(id) {
                let mut both = ids.get(&r.key).copied().unwrap_or_default();
                both[slot(r.family)] = None;
                match both {
                    [None, None] => drop(ids.remove(&r.key)),
                    _ => drop(ids.insert(r.key.clone(), both)),
                }
            }
        }
        for f in &delta.changed {
            let route = Arc::new(Route::new(&snap.state, f, registry, policies, local, metrics));
            let mut both = ids.get(&route.key).copied().unwrap_or_default();
            both[slot(route.family)] = Some(f.id);
            ids.insert(route.key.clone(), both);
            by_id.insert(f.id, route);
        }
        let (nodes, workloads, routes) = (prev.nodes.clone(), prev.workloads.clone(), snap.state.routes.clone());
        // A write with a delta changed services only: policies and
        // workloads are as they were.
        let guard = prev.guard.clone();
        Self { by_id, ids, generation: snap.generation, nodes, workloads, routes, guard }
    }

    /// Takes over the series of every route of `old` with the same name.
    fn adopt_all_series(&self, old: &RouteTable) {
        let by_key: HashMap<(&PortKey, Family), &Route> =
            old.by_id.values().map(|r| ((&r.key, r.family), r.as_ref())).collect();
        for r in self.by_id.values() {
            if let Some(o) = by_key.get(&(&r.key, r.family)) {
                r.adopt_series(o);
            }
        }
    }

    /// Drops from `metrics` the series this table made that `next` has not
    /// (a route or an endpoint that left the state).
    pub fn forget_series_missing_from(&self, next: &RouteTable, metrics: &Metrics) {
        let by_key: HashMap<(&PortKey, Family), &Route> =
            next.by_id.values().map(|r| ((&r.key, r.family), r.as_ref())).collect();
        let ports: std::collections::HashSet<&PortKey> = by_key.keys().map(|(k, _)| *k).collect();
        for r in self.by_id.values() {
            r.forget_series_missing_from(by_key.get(&(&r.key, r.family)).copied(), ports.contains(&r.key), metrics);
        }
        if !Arc::ptr_eq(&self.routes, &next.routes) {
            let kept = next.routes.series_keys();
            metrics.forget_route_series(self.routes.series_keys().iter().filter(|k| !kept.contains(*k)));
        }
    }
    /// `meshctl stats` rows of every endpoint of every route.
    pub fn stats_rows(&self) -> Vec<StatsRow> {
        let now = Instant::now();
        let mut rows: Vec<StatsRow> = self
            .by_id
            .values()
            .flat_map(|r| {
                let errors = r.series.get().map_or(0, |s| s.failures());
                r.endpoints.iter().map(move |e| {
                    let rtt = Some(e.state.view(now).ewma_rtt_ms);
                    match e.series.get() {
                        Some(s) => s.row(errors, rtt),
                        None => StatsRow::idle(&r.name, &e.state.addr.to_string(), "outbound", errors, rtt),
                    }
                })
            })
            .collect();
        rows.sort_by(|a, b| (&a.service, &a.endpoint).cmp(&(&b.service, &b.endpoint)));
        rows
    }

    pub fn route(&self, id: u32) -> Option<&Arc<Route>> {
        self.by_id.get(&id)
    }

    /// The route of service port `key` for a client of `family`: its
    /// frontend of that family, else (a single-stack backend) its other
    /// one; with its kernel id.
    pub fn route_of(&self, key: &PortKey, family: Family) -> Option<(u32, &Arc<Route>)> {
        let both = self.ids.get(key)?;
        let id = both[slot(family)].or(both[1 - slot(family)])?;
        Some((id, self.by_id.get(&id)?))
    }

    /// Whether service port `key` has a route (of either family).
    pub fn has_port(&self, key: &PortKey) -> bool {
        self.ids.get(key).is_some()
    }

    /// The enrolled workload at `ip`.
    pub fn workload(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workloads.get(&ip)
    }
}

/// Route tables for the unit tests of the proxy's paths.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::model::parse_document;

    /// The table of one service `web` (10.96.0.10:80 -> 8080) on node a,
    /// with `extra` lines of its YAML (endpoints, retries...).
    pub(crate) fn table_with(extra: &str, metrics: &Arc<Metrics>) -> (RouteTable, Registry) {
        table_on(8080, extra, metrics)
    }

    /// As [`table_with`], its endpoints listening on `target_port`.
    pub(crate) fn table_on(target_port: u16, extra: &str, metrics: &Arc<Metrics>) -> (RouteTable, Registry) {
        table_of(&format!("port: 80, targetPort: {target_port}"), extra, metrics)
    }

    /// As [`table_on`], with `port` (YAML: `port: 80, ...`) the one port
    /// of service `web`.
    pub(crate) fn table_of(port: &str, extra: &str, metrics: &Arc<Metrics>) -> (RouteTable, Registry) {
        let doc = parse_document(&format!(
            "nodes: [{{name: a, address: 172.18.0.2}}]\n\
             services:\n - name: web\n   vip: 10.96.0.10\n   ports: [{{{port}}}]\n{extra}"
        ))
        .unwrap();
        let state = Arc::new(State::from_document(&doc).unwrap());
        let ids = crate::model::ServiceIds::default().assign(&state.frontend_keys());
        let registry = Registry::default();
        let local =
            Local { node: NodeName::parse("a").unwrap(), trust_domain: "cluster.local".into(), tunnel_port: 15008 };
        (RouteTable::build(&state, &state.frontends(&ids), &registry, &Default::default(), &local, metrics), registry)
    }
}

#[cfg(test)]
mod tests;
