//! The tunnel's inbound side.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::TunnelCounters;
use crate::drain::Drain;
use crate::identity::tls::identity_of;
use crate::identity::Identity;
use crate::model::{Authorization, NodeName, State};
use crate::proxy::relay::{relay, Transfer};
use crate::telemetry::metrics::{ConnLabels, EndpointSeries};
use crate::telemetry::Metrics;

/// One service with endpoints on this node, as inbound checks see it.
#[derive(Debug)]
struct LocalService {
    policy: Option<Authorization>,
    /// Its endpoints on this node (ip, target port), each with its inbound
    /// series, shared with the streams so a stream copies no labels.
    targets: HashMap<SocketAddrV4, Arc<EndpointSeries>>,
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
}

impl Deny {
    pub fn as_str(self) -> &'static str {
        match self {
            Deny::NotLocal => "not-local",
            Deny::NotEndpoint => "not-service-endpoint",
            Deny::Policy => "policy",
        }
    }
}

/// What inbound checks need from the state.
#[derive(Debug, Default)]
pub struct Inbound {
    trust_domain: String,
    /// Enrolled workloads of this node, with their identities (logged
    /// beside the peer's when a stream to them is refused).
    local: HashMap<Ipv4Addr, Identity>,
    /// By `namespace/name`.
    services: HashMap<String, LocalService>,
}

impl Inbound {
    pub fn build(state: &State, node: &NodeName, trust_domain: &str, metrics: &Metrics) -> Self {
        let local = state
            .workloads
            .iter()
            .filter(|w| &w.node == node)
            .map(|w| (w.ip, Identity::workload(trust_domain, &w.namespace, &w.service_account)))
            .collect();
        let mut services = HashMap::new();
        for s in &state.services {
            let mut targets = HashMap::new();
            for p in &s.ports {
                for e in s.endpoints.iter().filter(|e| &e.node == node) {
                    let addr = e.addr(p.target_port);
                    targets.entry(addr).or_insert_with(|| {
                        Arc::new(metrics.endpoint_series(ConnLabels {
                            service: format!("{}:{}", s.key(), p.port),
                            endpoint: addr.to_string(),
                            direction: "inbound",
                        }))
                    });
                }
            }
            if !targets.is_empty() {
                services.insert(s.key(), LocalService { policy: s.authorization.clone(), targets });
            }
        }
        Self { trust_domain: trust_domain.to_owned(), local, services }
    }

    fn series(&self) -> impl Iterator<Item = &Arc<EndpointSeries>> {
        self.services.values().flat_map(|s| s.targets.values())
    }

    /// Drops from `metrics` the series of this view that `next` has not.
    pub fn forget_series_missing_from(&self, next: &Inbound, metrics: &Metrics) {
        let kept: HashSet<&ConnLabels> = next.series().map(|s| &s.labels).collect();
        for s in self.series().filter(|s| !kept.contains(&s.labels)) {
            metrics.forget_endpoint(&s.labels);
        }
    }

    /// Whether `peer` may open a stream to `target` for `service`: the
    /// target is a workload of this node and an endpoint of that service
    /// here, and the service's policy allows the peer. Returns the
    /// stream's series.
    pub fn check(
        &self,
        service: Option<&str>,
        target: SocketAddrV4,
        peer: &Identity,
    ) -> Result<&Arc<EndpointSeries>, Deny> {
        if !self.local.contains_key(target.ip()) {
            return Err(Deny::NotLocal);
        }
        let svc = service.and_then(|s| self.services.get(s)).ok_or(Deny::NotEndpoint)?;
        let series = svc.targets.get(&target).ok_or(Deny::NotEndpoint)?;
        if !Authorization::allows(svc.policy.as_ref(), &self.trust_domain, peer) {
            return Err(Deny::Policy);
        }
        Ok(series)
    }

    /// The identity of the local workload at `ip`, for logs.
    fn workload_identity(&self, ip: &Ipv4Addr) -> Option<&Identity> {
        self.local.get(ip)
    }
}

pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    inbound: Arc<ArcSwap<Inbound>>,
    counters: Arc<TunnelCounters>,
    drain: Drain,
) {
    let conns = drain.clone();
    crate::drain::accept_loop(listener, "tunnel", drain, move |tcp, peer| {
        let (acceptor, inbound, counters, drain) = (acceptor.clone(), inbound.clone(), counters.clone(), conns.clone());
        tokio::spawn(async move { connection(tcp, peer, acceptor, inbound, counters, drain).await });
    })
    .await;
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    inbound: Arc<ArcSwap<Inbound>>,
    counters: Arc<TunnelCounters>,
    drain: Drain,
) {
    let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let reason = counters.tls_failed(&e);
            warn!(%peer, reason, error = %e, "tunnel handshake refused");
            return;
        }
        Err(_) => {
            TunnelCounters::inc(&counters.tls_failures);
            warn!(%peer, "tunnel handshake timed out");
            return;
        }
    };
    let id = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(identity_of);
    let Some(id) = id else {
        TunnelCounters::inc(&counters.tls_failures);
        warn!(%peer, "tunnel peer certificate has no SPIFFE ID; closed");
        return;
    };
    TunnelCounters::inc(&counters.handshakes);
    debug!(%peer, identity = %id, "tunnel connection");
    let id = Arc::new(id);
    let streams = drain.clone();
    let svc = hyper::service::service_fn(move |req| {
        let (id, inbound, counters, drain) = (id.clone(), inbound.clone(), counters.clone(), streams.clone());
        async move { Ok::<_, Infallible>(stream(req, &id, &inbound.load(), &counters, &drain).await) }
    });
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .max_frame_size(super::MAX_FRAME_SIZE)
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10));
    let conn = builder.serve_connection(TokioIo::new(tls), svc);
    tokio::pin!(conn);
    // On drain: GOAWAY, so the peer opens no new stream here and the open
    // ones finish.
    let ended = tokio::select! {
        r = conn.as_mut() => r,
        _ = drain.stopped() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = ended {
        debug!(%peer, error = %e, "tunnel connection ended");
    }
}

fn status(code: StatusCode) -> Response<Empty<Bytes>> {
    let mut r = Response::new(Empty::new());
    *r.status_mut() = code;
    r
}

async fn stream(
    req: Request<hyper::body::Incoming>,
    peer: &Identity,
    inbound: &Inbound,
    counters: &TunnelCounters,
    drain: &Drain,
) -> Response<Empty<Bytes>> {
    let target = req.uri().authority().and_then(|a| a.as_str().parse::<SocketAddrV4>().ok());
    let (true, Some(target)) = (req.method() == Method::CONNECT, target) else {
        TunnelCounters::inc(&counters.bad_requests);
        warn!(identity = %peer, method = %req.method(), uri = %req.uri(), "tunnel request is not CONNECT ip:port; refused");
        return status(StatusCode::BAD_REQUEST);
    };
    let service = req.headers().get(super::SERVICE_HEADER).and_then(|v| v.to_str().ok());
    let series = match inbound.check(service, target, peer) {
        Ok(s) => s.clone(),
        Err(deny) => {
            let (counter, why) = match deny {
                Deny::NotLocal => (&counters.denied_not_local, "the target is not a workload of this node"),
                Deny::NotEndpoint => {
                    (&counters.denied_not_endpoint, "the target is not an endpoint of the service the stream names")
                }
                Deny::Policy => (&counters.denied_policy, "authorization policy does not allow this identity"),
            };
            TunnelCounters::inc(counter);
            let target_identity = inbound.workload_identity(target.ip()).map(tracing::field::display);
            warn!(identity = %peer, target_identity, %target, service = service.unwrap_or(""), reason = deny.as_str(), "{why}; refused (403)");
            let mut r = status(StatusCode::FORBIDDEN);
            r.headers_mut().insert(super::DENY_HEADER, hyper::header::HeaderValue::from_static(deny.as_str()));
            return r;
        }
    };
    let upstream = match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            TunnelCounters::inc(&counters.upstream_failures);
            warn!(identity = %peer, %target, error = %e, "connect to the workload failed");
            return status(StatusCode::BAD_GATEWAY);
        }
        Err(_) => {
            TunnelCounters::inc(&counters.upstream_failures);
            return status(StatusCode::GATEWAY_TIMEOUT);
        }
    };
    let _ = upstream.set_nodelay(true);
    TunnelCounters::inc(&counters.streams);
    let (peer, guard) = (peer.clone(), drain.guard());
    tokio::spawn(async move {
        let _guard = guard;
        let started = tokio::time::Instant::now();
        let mut up = match hyper::upgrade::on(req).await {
            Ok(up) => TokioIo::new(up),
            Err(e) => {
                debug!(identity = %peer, %target, error = %e, "tunnel stream upgrade failed");
                return;
            }
        };
        series.opened.inc();
        let mut upstream = upstream;
        let Transfer { up: bytes_in, down: bytes_out, error } = relay(&mut up, &mut upstream).await;
        let duration_ms = started.elapsed().as_millis() as u64;
        series.closed.inc();
        series.sent.inc_by(bytes_in);
        series.received.inc_by(bytes_out);
        let service = series.labels.service.as_str();
        match error {
            None => {
                info!(target: "access", direction = "inbound", identity = %peer, service, endpoint = %target, bytes_in, bytes_out, duration_ms, outcome = "ok", "closed")
            }
            Some(e) => {
                info!(target: "access", direction = "inbound", identity = %peer, service, endpoint = %target, bytes_in, bytes_out, duration_ms, outcome = "error", error = %e, "closed")
            }
        }
    });
    status(StatusCode::OK)
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
        Inbound::build(&state, &NodeName::parse("b").unwrap(), "cluster.local", &Metrics::new())
    }

    fn id(sa: &str) -> Identity {
        Identity::parse(&format!("spiffe://cluster.local/ns/default/sa/{sa}")).unwrap()
    }

    fn target(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    #[test]
    fn an_allowed_peer_reaches_the_endpoint_of_the_service_it_names() {
        let i = inbound();
        let series = i.check(Some("default/web"), target("10.244.2.3:8080"), &id("client")).unwrap();
        assert_eq!(series.labels.service, "default/web:80");
        assert!(i.check(Some("default/echo"), target("10.244.2.3:9000"), &id("evil")).is_ok(), "echo has no policy");
    }

    #[test]
    fn a_denied_peer_gets_policy() {
        assert_eq!(i_check("default/web", "10.244.2.3:8080", "evil"), Err(Deny::Policy));
    }

    fn i_check(service: &str, t: &str, sa: &str) -> Result<(), Deny> {
        inbound().check(Some(service), target(t), &id(sa)).map(|_| ())
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
        assert_eq!(i.check(None, target("10.244.2.3:8080"), &id("client")).map(|_| ()), Err(Deny::NotEndpoint));
        assert_eq!(i_check("default/nope", "10.244.2.3:8080", "client"), Err(Deny::NotEndpoint));
    }

    #[test]
    fn a_target_that_is_not_a_workload_of_this_node_is_refused_first() {
        assert_eq!(i_check("default/web", "10.244.1.2:8080", "client"), Err(Deny::NotLocal));
        assert_eq!(i_check("default/web", "10.0.0.1:22", "client"), Err(Deny::NotLocal));
    }
}
