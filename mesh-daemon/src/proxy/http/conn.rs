//! What every request of one client connection shares, and the route each
//! request takes: read from the route table published at that moment, so
//! a connection held open follows every write (a drain, a new endpoint, a
//! weight or a policy change) from its next request on.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;

use super::upstream::{Dial, Endpoint, Upstreams};
use crate::env::Env;
use crate::model::{AppProtocol, PortKey};
use crate::proxy::error::ConnectError;
use crate::proxy::{ProxyCounters, Route, RouteEndpoint, RouteTable, Workload};
use crate::telemetry::otlp::Spans;
use crate::tunnel::client::Pool;

/// What every request of one client connection shares.
pub struct Conn {
    /// The table every request reads its route (and policies) from.
    pub(super) routes: Arc<ArcSwap<RouteTable>>,
    /// The kernel's id of the service port the client dialled.
    service_id: u32,
    /// The family of the VIP it dialled: a routed request's backend is
    /// taken in it when the backend has a VIP of it.
    family: crate::model::Family,
    /// The route the last request took, with the clients it found: kept
    /// while the table holds the same route (the same `Arc`).
    resolved: ArcSwap<Resolved>,
    /// The backend services routes sent this connection's requests to,
    /// kept like `resolved` (at most [`MAX_BACKENDS`]).
    backends: Mutex<Vec<Arc<Resolved>>>,
    pub source: Option<Arc<Workload>>,
    pub client: SocketAddr,
    pub upstreams: Arc<Upstreams>,
    pub tunnel: Option<Arc<Pool>>,
    /// gRPC: failures answer with a gRPC status, not an HTTP one.
    pub grpc: bool,
    /// HTTP/2 with prior knowledge (else HTTP/1.1), to the client and so
    /// to the endpoints.
    pub http2: bool,
    pub counters: Arc<ProxyCounters>,
    /// Where spans of sampled requests go.
    pub spans: Arc<Spans>,
    /// Closes an HTTP/2 client connection, or an upgraded one, that moves
    /// nothing this long (`--idle-timeout`).
    pub idle: Duration,
    /// The clock and randomness of its decisions.
    pub env: &'static dyn Env,
    /// The largest request header block (`--max-request-headers`).
    pub max_headers: usize,
}

/// One route of the table, as requests use it: the connections of each
/// endpoint are found on first use, once per route and connection, not
/// per request. They live in [`Upstreams`], keyed by how the endpoint is
/// reached, so a new route with the same endpoints finds the same
/// connections open.
pub struct Resolved {
    pub route: Arc<Route>,
    clients: Vec<OnceLock<Arc<Endpoint>>>,
}

impl Resolved {
    fn new(route: Arc<Route>) -> Self {
        let clients = route.endpoints.iter().map(|_| OnceLock::new()).collect();
        Self { route, clients }
    }

    /// The connections to endpoint `i` (`ep`) of the route.
    pub fn client(&self, i: usize, ep: &RouteEndpoint, conn: &Conn) -> Result<&Arc<Endpoint>, ConnectError> {
        if let Some(c) = self.clients[i].get() {
            return Ok(c);
        }
        let dial = dial(ep, &self.route, conn)?;
        let c = conn.upstreams.endpoint(dial, conn.http2, conn.tunnel.as_ref(), self.route.connect_timeout);
        Ok(self.clients[i].get_or_init(|| c))
    }
}

/// What a client connection is given at accept.
pub struct Accepted {
    pub routes: Arc<ArcSwap<RouteTable>>,
    pub service_id: u32,
    /// The route the connection was accepted on.
    pub route: Arc<Route>,
    pub source: Option<Arc<Workload>>,
    pub client: SocketAddr,
    pub proto: AppProtocol,
    /// The largest request header block (`--max-request-headers`).
    pub max_headers: usize,
}

impl Conn {
    pub fn new(
        at: Accepted,
        upstreams: Arc<Upstreams>,
        tunnel: Option<Arc<Pool>>,
        counters: Arc<ProxyCounters>,
        spans: Arc<Spans>,
        idle: Duration,
        env: &'static dyn Env,
    ) -> Self {
        let Accepted { routes, service_id, route, source, client, proto, max_headers } = at;
        let (grpc, http2) = (proto == AppProtocol::Grpc, proto != AppProtocol::Http);
        let family = route.family;
        let resolved = ArcSwap::from_pointee(Resolved::new(route));
        Self {
            family,
            routes,
            service_id,
            resolved,
            backends: Mutex::default(),
            source,
            client,
            upstreams,
            tunnel,
            grpc,
            http2,
            counters,
            spans,
            idle,
            env,
            max_headers,
        }
    }

    /// The route a request takes now: the service port's route in the
    /// table as it is, or None once the service port left the state
    /// (kernel service ids are never given again, see
    /// [`crate::model::ServiceIds`]).
    pub fn resolve(&self) -> Option<Arc<Resolved>> {
        let table = self.routes.load();
        let route = table.route(self.service_id)?;
        let last = self.resolved.load_full();
        if Arc::ptr_eq(&last.route, route) {
            return Some(last);
        }
        let next = Arc::new(Resolved::new(route.clone()));
        self.resolved.store(next.clone());
        Some(next)
    }
}

/// Backend services one client connection keeps resolved; a route with
/// more sends the others' requests through a fresh lookup.
const MAX_BACKENDS: usize = 16;

impl Conn {
    /// The route of backend service port `key` as the table has it now
    /// (None once it left the state).
    pub fn backend(&self, key: &PortKey) -> Option<Arc<Resolved>> {
        let table = self.routes.load();
        let (_, route) = table.route_of(key, self.family)?;
        let mut cache = self.backends.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = cache.iter().find(|r| Arc::ptr_eq(&r.route, route)) {
            return Some(r.clone());
        }
        let next = Arc::new(Resolved::new(route.clone()));
        match cache.iter().position(|r| r.route.key == *key) {
            Some(i) => cache[i] = next.clone(),
            None => {
                if cache.len() >= MAX_BACKENDS {
                    cache.remove(0);
                }
                cache.push(next.clone());
            }
        }
        Some(next)
    }
}

/// How to reach `ep` of `route` for a request of `conn`'s client (see
/// [`crate::proxy::dial`]), as the key of its pool.
pub fn dial(ep: &RouteEndpoint, route: &Route, conn: &Conn) -> Result<Dial, ConnectError> {
    let addr = ep.state.addr;
    match crate::proxy::dial::via(ep, route) {
        Some(via) => {
            let source = conn.source.as_ref().ok_or_else(|| ConnectError::NoIdentity { addr, node: via.0.clone() })?;
            Ok(Dial::Tunnel {
                target: addr,
                via: via.clone(),
                source: source.identity.clone(),
                service: route.key.service.clone(),
            })
        }
        None => Ok(Dial::Direct(addr)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::routes::testing::table_with;
    use crate::telemetry::Metrics;

    fn conn(routes: &Arc<ArcSwap<RouteTable>>, metrics: &Metrics) -> Conn {
        let route = routes.load().route(1).unwrap().clone();
        let at = Accepted {
            routes: routes.clone(),
            service_id: 1,
            route,
            source: None,
            client: "127.0.0.10:40000".parse().unwrap(),
            proto: AppProtocol::Http,
            max_headers: 65536,
        };
        let counters = Arc::new(ProxyCounters::new(metrics));
        let spans = Arc::new(Spans::disabled());
        Conn::new(at, Arc::default(), None, counters, spans, Duration::from_secs(60), &crate::env::Live)
    }

    #[tokio::test]
    async fn each_request_takes_the_route_the_table_holds_now() {
        let m = Arc::new(Metrics::new());
        let two = "   endpoints: [{ip: 10.0.0.1, node: a}, {ip: 10.0.0.2, node: a}]\n";
        let (table, _) = table_with(two, &m);
        let routes = Arc::new(ArcSwap::from_pointee(table));
        let conn = conn(&routes, &m);

        let first = conn.resolve().unwrap();
        assert!(Arc::ptr_eq(&first, &conn.resolve().unwrap()), "the same route: the same clients, nothing rebuilt");
        let ep = &first.route.endpoints[0];
        first.client(0, ep, &conn).unwrap();
        assert!(first.clients[0].get().is_some(), "found once, kept for the next request");

        // A write: 10.0.0.1 drained, 10.0.0.3 added.
        let (next, _) = table_with(
            "   endpoints: [{ip: 10.0.0.1, node: a, weight: 0}, {ip: 10.0.0.2, node: a}, {ip: 10.0.0.3, node: a}]\n",
            &m,
        );
        routes.store(Arc::new(next));
        let now = conn.resolve().unwrap();
        assert!(!Arc::ptr_eq(&first, &now), "the next request sees the write");
        let seen: Vec<(String, u16)> =
            now.route.endpoints.iter().map(|e| (e.state.addr.to_string(), e.weight)).collect();
        assert_eq!(seen, [("10.0.0.1:8080".into(), 0), ("10.0.0.2:8080".into(), 1), ("10.0.0.3:8080".into(), 1)],);
        assert!(now.clients.iter().all(|c| c.get().is_none()), "clients are found again for the new route");
        assert!(Arc::ptr_eq(&now, &conn.resolve().unwrap()));

        // The service leaves the state: its requests have nowhere to go.
        routes.store(Arc::new(RouteTable::default()));
        assert!(conn.resolve().is_none());
    }
}
