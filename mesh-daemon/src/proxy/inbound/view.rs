//! Which stream may reach which pod on this node: the services with
//! endpoints here, a pure decision per stream ([`Inbound::check`]), and
//! the series of each target.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use prometheus_client::metrics::histogram::Histogram;

use crate::identity::Identity;
use crate::model::{AppProtocol, Authorization, Delta, NodeName, Service, Snapshot, State, View};
use crate::shared_map::SharedMap;
use crate::telemetry::metrics::{ConnLabels, EndpointSeries, ServiceLabels, StatsRow, StatsSource};
use crate::telemetry::Metrics;

/// One service with endpoints on this node, as inbound checks see it.
#[derive(Debug)]
struct LocalService {
    policy: Option<Authorization>,
    /// Its endpoints on this node (ip, target port), shared with the
    /// streams so a stream copies no labels.
    targets: HashMap<SocketAddr, Arc<Target>>,
}

/// An endpoint on this node of one service port. Its series are made
/// when a stream first reaches it (as the outbound routes' are).
pub struct Target {
    series: OnceLock<Box<EndpointSeries>>,
    /// `mesh_response_latency_seconds` of the service port, inbound.
    response_latency: OnceLock<Histogram>,
    /// `namespace/name:port`.
    port: Arc<str>,
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    /// The port speaks gRPC: its requests are classed by gRPC status.
    pub grpc: bool,
    /// The service it is an endpoint of, for the policies.
    pub service: crate::model::ServiceKey,
    /// Its requests carry the verified caller in `x-forwarded-client-cert`.
    pub forward_client_cert: bool,
    /// Which of its streams and requests the access log writes.
    pub access_log: crate::model::AccessLog,
}

impl Target {
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.port, self.addr)
    }
}

impl Target {
    /// Its inbound series, made on first use.
    pub fn series(&self) -> &EndpointSeries {
        self.series.get_or_init(|| {
            Box::new(self.metrics.endpoint_series(ConnLabels {
                service: self.port.to_string(),
                endpoint: self.addr.to_string(),
                direction: "inbound",
            }))
        })
    }

    /// The service port's inbound response latency, made on first use.
    pub fn response_latency(&self) -> &Histogram {
        self.response_latency.get_or_init(|| {
            let labels = ServiceLabels { service: self.port.to_string(), direction: "inbound" };
            self.metrics.response_latency.get_or_create(&labels).clone()
        })
    }
}

/// Why a CONNECT was refused (403); the `mesh-deny` header carries
/// [`Deny::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deny {
    /// The target is not an enrolled workload of this node.
    NotLocal,
    /// No `mesh-service` header, an unknown service, or a target that is
    /// not an endpoint of it on this node.
    NotEndpoint,
    /// The service's authorization does not allow the peer.
    Policy,
    /// The peer's workload identity belongs to workloads the state places
    /// on other nodes than the one the stream came from.
    WrongNode,
}

impl Deny {
    /// Every reason (what the troubleshooting guide's test checks).
    #[cfg(test)]
    pub const ALL: [Deny; 4] = [Deny::NotLocal, Deny::NotEndpoint, Deny::Policy, Deny::WrongNode];

    pub fn as_str(self) -> &'static str {
        match self {
            Deny::NotLocal => "not-local",
            Deny::NotEndpoint => "not-service-endpoint",
            Deny::Policy => "policy",
            Deny::WrongNode => "wrong-node",
        }
    }
}

/// What inbound checks need from the state.
#[derive(Debug, Default)]
pub struct Inbound {
    trust_domain: String,
    /// The generation of the state it was built from.
    generation: u64,
    /// Enrolled workloads of this node, with their identities (logged
    /// beside the peer's when a stream to them is refused).
    local: HashMap<IpAddr, Identity>,
    /// By `namespace/name`: the service it was made from and what it
    /// needs here.
    services: SharedMap<String, (Arc<Service>, Arc<LocalService>)>,
    /// For each workload identity, the addresses of the nodes its
    /// workloads run on: where its streams may come from.
    homes: HashMap<Identity, Vec<std::net::IpAddr>>,
    /// The authorization policies, for the streams and requests this node
    /// hands to its workloads.
    pub guard: Arc<crate::proxy::authz::Guard>,
}

impl LocalService {
    /// What `s` needs on `node`; None: no endpoint there.
    fn of(s: &Service, node: &NodeName, metrics: &Arc<Metrics>) -> Option<Self> {
        let mut targets = HashMap::new();
        for p in &s.ports {
            let mut port: Option<Arc<str>> = None;
            for e in s.endpoints.iter().filter(|e| &e.node == node) {
                let addr = e.addr(p.target_port);
                let port = port.get_or_insert_with(|| format!("{}:{}", s.key(), p.port).into()).clone();
                targets.entry(addr).or_insert_with(|| {
                    Arc::new(Target {
                        series: OnceLock::new(),
                        response_latency: OnceLock::new(),
                        port,
                        addr,
                        metrics: metrics.clone(),
                        grpc: p.app_protocol == AppProtocol::Grpc,
                        service: s.key(),
                        forward_client_cert: s.http.forward_client_cert,
                        access_log: s.access_log,
                    })
                });
            }
        }
        (!targets.is_empty()).then(|| LocalService { policy: s.authorization.clone(), targets })
    }
}

impl Inbound {
    #[cfg(test)]
    pub fn build(state: &Arc<State>, node: &NodeName, trust_domain: &str, metrics: &Arc<Metrics>) -> Self {
        Self::build_from(state, 1, node, trust_domain, metrics, &Inbound::default())
    }

    /// Builds the checks of `state`, taking every service `prev` had from
    /// the same `Arc` from `prev` as it is.
    pub fn build_from(
        state: &Arc<State>,
        generation: u64,
        node: &NodeName,
        trust_domain: &str,
        metrics: &Arc<Metrics>,
        prev: &Inbound,
    ) -> Self {
        let local = state
            .workloads
            .iter()
            .filter(|w| &w.node == node)
            .flat_map(|w| {
                let id = Identity::workload(trust_domain, &w.namespace, &w.service_account);
                w.ips.iter().map(move |ip| (ip, id.clone()))
            })
            .collect();
        let mut services = SharedMap::default();
        for s in &state.services {
            let key = s.key().to_string();
            if let Some(kept) = prev.services.get(&key).filter(|(old, _)| Arc::ptr_eq(old, s)) {
                services.insert(key, kept.clone());
            } else if let Some(l) = LocalService::of(s, node, metrics) {
                services.insert(key, (s.clone(), Arc::new(l)));
            }
        }
        let mut homes: HashMap<Identity, Vec<std::net::IpAddr>> = HashMap::new();
        for w in &state.workloads {
            if let Some(n) = state.node(&w.node) {
                let id = Identity::workload(trust_domain, &w.namespace, &w.service_account);
                let addrs = homes.entry(id).or_default();
                for a in n.addresses.iter() {
                    if !addrs.contains(&a) {
                        addrs.push(a);
                    }
                }
            }
        }
        let guard = Arc::new(crate::proxy::authz::Guard::build(state, trust_domain));
        Self { trust_domain: trust_domain.to_owned(), generation, local, services, homes, guard }
    }

    /// `prev` with the services `delta` changed (workloads and nodes are
    /// as they were), and the keys it changed.
    fn apply(
        prev: &Inbound,
        snap: &Snapshot,
        delta: &Delta,
        node: &NodeName,
        metrics: &Arc<Metrics>,
    ) -> (Self, Vec<String>) {
        let mut services = prev.services.clone();
        let mut keys: Vec<String> = delta.before.iter().map(|s| s.key().to_string()).collect();
        for k in &keys {
            services.remove(k);
        }
        let mut seen = HashSet::new();
        for f in delta.changed.iter().filter(|f| seen.insert(f.service)) {
            let s = &snap.state.services[f.service];
            let key = s.key().to_string();
            if let Some(l) = LocalService::of(s, node, metrics) {
                services.insert(key.clone(), (s.clone(), Arc::new(l)));
            }
            keys.push(key);
        }
        keys.sort();
        keys.dedup();
        let next = Self {
            trust_domain: prev.trust_domain.clone(),
            generation: snap.generation,
            local: prev.local.clone(),
            services,
            homes: prev.homes.clone(),
            guard: prev.guard.clone(),
        };
        (next, keys)
    }

    /// Every target, with its service's key.
    fn targets(&self) -> impl Iterator<Item = (&str, &Arc<Target>)> {
        self.services.iter().flat_map(|(k, (_, s))| s.targets.values().map(move |t| (k.as_str(), t)))
    }

    /// Calls `f` with each service (`keys`: those only).
    fn each_service(&self, keys: Option<&[String]>, mut f: impl FnMut(&String, &Arc<LocalService>)) {
        match keys {
            Some(keys) => keys.iter().for_each(|k| {
                if let Some((_, s)) = self.services.get(k) {
                    f(k, s)
                }
            }),
            None => self.services.iter().for_each(|(k, (_, s))| f(k, s)),
        }
    }

    /// Takes over the series `old` made for the same services and targets
    /// (`keys`: only those services).
    pub fn adopt_series(&self, old: &Inbound, keys: Option<&[String]>) {
        let adopt = |key: &String, s: &Arc<LocalService>| {
            let Some((_, o)) = old.services.get(key) else { return };
            if Arc::ptr_eq(s, o) {
                return;
            }
            for (addr, t) in &s.targets {
                let Some(ot) = o.targets.get(addr) else { continue };
                if let Some(series) = ot.series.get() {
                    let _ = t.series.set(series.clone());
                }
                if let Some(h) = ot.response_latency.get() {
                    let _ = t.response_latency.set(h.clone());
                }
            }
        };
        self.each_service(keys, adopt);
    }

    /// Drops from `metrics` the series this view made that `next` has not
    /// (`keys`: looking only at those services).
    pub fn forget_series_missing_from(&self, next: &Inbound, metrics: &Metrics, keys: Option<&[String]>) {
        let mut ports: Option<HashSet<&str>> = None;
        let forget = |key: &String, s: &Arc<LocalService>| {
            let kept_service = next.services.get(key).map(|(_, n)| n);
            if kept_service.is_some_and(|n| Arc::ptr_eq(s, n)) {
                return;
            }
            for t in s.targets.values() {
                let kept = kept_service.is_some_and(|n| n.targets.contains_key(&t.addr));
                if let (Some(series), false) = (t.series.get(), kept) {
                    metrics.forget_endpoint(&series.labels);
                }
                if t.response_latency.get().is_none() {
                    continue;
                }
                let ports = ports.get_or_insert_with(|| next.targets().map(|(_, t)| t.port.as_ref()).collect());
                if !ports.contains(t.port.as_ref()) {
                    let labels = ServiceLabels { service: t.port.to_string(), direction: "inbound" };
                    metrics.response_latency.remove(&labels);
                }
            }
        };
        self.each_service(keys, forget);
    }

    /// Whether `peer`, connected from `from`, may open a stream to `target`
    /// for `service`: the target is a workload of this node and an
    /// endpoint of that service here; when the state places workloads of
    /// the peer's identity, the stream comes from one of their nodes; and
    /// the service's policy allows the peer. Returns the target.
    pub fn check(
        &self,
        service: Option<&str>,
        target: SocketAddr,
        peer: &Identity,
        from: std::net::IpAddr,
    ) -> Result<&Arc<Target>, Deny> {
        if !self.local.contains_key(&target.ip()) {
            return Err(Deny::NotLocal);
        }
        let (_, svc) = service.and_then(|s| self.services.get(s)).ok_or(Deny::NotEndpoint)?;
        let found = svc.targets.get(&target).ok_or(Deny::NotEndpoint)?;
        if self.homes.get(peer).is_some_and(|homes| !homes.contains(&from)) {
            return Err(Deny::WrongNode);
        }
        if !Authorization::allows(svc.policy.as_ref(), &self.trust_domain, peer) {
            return Err(Deny::Policy);
        }
        Ok(found)
    }

    /// `meshctl stats` rows of the streams to this node's endpoints.
    pub fn stats_rows(&self) -> Vec<StatsRow> {
        let mut rows: Vec<StatsRow> = self
            .targets()
            .map(|(_, t)| match t.series.get() {
                Some(s) => s.row(0, None),
                None => StatsRow::idle(&t.port, &t.addr.to_string(), "inbound", 0, None),
            })
            .collect();
        rows.sort_by(|a, b| (&a.service, &a.endpoint).cmp(&(&b.service, &b.endpoint)));
        rows
    }

    /// The identity of the local workload at `ip`, for logs.
    pub(super) fn workload_identity(&self, ip: IpAddr) -> Option<&Identity> {
        self.local.get(&ip)
    }
}

/// The tunnel's reader of the state: rebuilds this node's inbound checks
/// from each snapshot.
pub struct InboundView {
    view: Arc<ArcSwap<Inbound>>,
    node: NodeName,
    trust_domain: String,
    metrics: Arc<Metrics>,
}

impl InboundView {
    pub fn new(node: NodeName, trust_domain: &str, metrics: Arc<Metrics>) -> Self {
        let view = Arc::new(ArcSwap::from_pointee(Inbound::default()));
        Self { view, node, trust_domain: trust_domain.to_owned(), metrics }
    }

    pub fn view(&self) -> Arc<ArcSwap<Inbound>> {
        self.view.clone()
    }
}

impl View for InboundView {
    fn update(&self, snap: &Snapshot) {
        let current = self.view.load();
        let (next, keys) = match &snap.delta {
            // One write after the view's: only the services it changed.
            Some(d) if current.generation + 1 == snap.generation => {
                let (next, keys) = Inbound::apply(&current, snap, d, &self.node, &self.metrics);
                (next, Some(keys))
            }
            _ => {
                let next = Inbound::build_from(
                    &snap.state,
                    snap.generation,
                    &self.node,
                    &self.trust_domain,
                    &self.metrics,
                    &current,
                );
                (next, None)
            }
        };
        next.adopt_series(&current, keys.as_deref());
        let next = Arc::new(next);
        self.view.swap(next.clone()).forget_series_missing_from(&next, &self.metrics, keys.as_deref());
    }
}

impl StatsSource for InboundView {
    fn stats_rows(&self) -> Vec<StatsRow> {
        self.view.load().stats_rows()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_document;

    /// Node b runs web-b (10.244.2.3, sa web) serving `web` on 8080 and
    /// `echo` on 9000; `web` allows only sa/client.
    fn inbound() -> Inbound {
        let doc = parse_document(
            "nodes: [{name: a, address: 172.18.0.2}, {name: b, address: 172.18.0.3}]\n\
             workloads: [{name: web-b, serviceAccount: web, node: b, ip: 10.244.2.3, pid: 1},\n\
             \x20 {name: client, serviceAccount: client, node: a, ip: 10.244.1.2, pid: 1}]\n\
             services:\n\
             \x20- {name: web, vip: 10.96.0.10, ports: [{port: 80, targetPort: 8080}], endpoints: [{ip: 10.244.2.3, node: b}],\n\
             \x20   authorization: {identities: [\"spiffe://cluster.local/ns/default/sa/client\"]}}\n\
             \x20- {name: echo, vip: 10.96.0.11, ports: [{port: 9000}], endpoints: [{ip: 10.244.2.3, node: b}]}\n",
        )
        .unwrap();
        let state = State::from_document(&doc).unwrap();
        Inbound::build(&Arc::new(state), &NodeName::parse("b").unwrap(), "cluster.local", &Arc::new(Metrics::new()))
    }

    fn id(sa: &str) -> Identity {
        Identity::parse(&format!("spiffe://cluster.local/ns/default/sa/{sa}")).unwrap()
    }

    fn target(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Node a's address: where sa/client's streams come from.
    fn node_a() -> std::net::IpAddr {
        "172.18.0.2".parse().unwrap()
    }

    #[test]
    fn a_workload_identity_is_let_through_only_from_the_node_it_runs_on() {
        let i = inbound();
        let from_b: std::net::IpAddr = "172.18.0.3".parse().unwrap();
        let from_pod: std::net::IpAddr = "10.244.1.2".parse().unwrap();
        let web = |from| i.check(Some("default/web"), target("10.244.2.3:8080"), &id("client"), from).map(|_| ());
        assert_eq!(web(node_a()), Ok(()));
        assert_eq!(web(from_b), Err(Deny::WrongNode), "sa/client runs on a, not b");
        assert_eq!(web(from_pod), Err(Deny::WrongNode), "a pod is not its node's proxy");
        // An identity the state has no workload of: nothing to tell by;
        // the policy decides (echo has none).
        let echo = i.check(Some("default/echo"), target("10.244.2.3:9000"), &id("stranger"), from_b);
        assert!(echo.is_ok());
    }

    #[test]
    fn an_allowed_peer_reaches_the_endpoint_of_the_service_it_names() {
        let i = inbound();
        let t = i.check(Some("default/web"), target("10.244.2.3:8080"), &id("client"), node_a()).unwrap();
        assert_eq!(t.series().labels.service, "default/web:80");
        assert!(
            i.check(Some("default/echo"), target("10.244.2.3:9000"), &id("evil"), node_a()).is_ok(),
            "echo has no policy"
        );
    }

    #[test]
    fn a_denied_peer_gets_policy() {
        assert_eq!(i_check("default/web", "10.244.2.3:8080", "evil"), Err(Deny::Policy));
    }

    fn i_check(service: &str, t: &str, sa: &str) -> Result<(), Deny> {
        inbound().check(Some(service), target(t), &id(sa), node_a()).map(|_| ())
    }

    #[test]
    fn other_ports_of_an_endpoint_are_not_reachable_in_the_name_of_a_service() {
        // b1 listens on 9090 too, but it is no port of web: whatever the identity.
        assert_eq!(i_check("default/web", "10.244.2.3:9090", "evil"), Err(Deny::NotEndpoint));
        assert_eq!(i_check("default/web", "10.244.2.3:9090", "client"), Err(Deny::NotEndpoint));
        assert_eq!(i_check("default/web", "10.244.2.3:22", "client"), Err(Deny::NotEndpoint));
        // echo's port is not web's either, even for web's allowed client.
        assert_eq!(i_check("default/web", "10.244.2.3:9000", "client"), Err(Deny::NotEndpoint));
    }

    #[test]
    fn a_stream_without_a_known_service_is_refused() {
        let i = inbound();
        assert_eq!(
            i.check(None, target("10.244.2.3:8080"), &id("client"), node_a()).map(|_| ()),
            Err(Deny::NotEndpoint)
        );
        assert_eq!(i_check("default/nope", "10.244.2.3:8080", "client"), Err(Deny::NotEndpoint));
    }

    #[test]
    fn a_target_that_is_not_a_workload_of_this_node_is_refused_first() {
        assert_eq!(i_check("default/web", "10.244.1.2:8080", "client"), Err(Deny::NotLocal));
        assert_eq!(i_check("default/web", "10.0.0.1:22", "client"), Err(Deny::NotLocal));
    }
}
