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
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::TunnelCounters;
use crate::identity::tls::identity_of;
use crate::identity::Identity;
use crate::model::{Authorization, NodeName, State};
use crate::proxy::relay::{relay, Transfer};
use crate::telemetry::metrics::{ConnLabels, EndpointSeries};
use crate::telemetry::Metrics;

/// A local endpoint address that services send tunnel streams to.
#[derive(Debug)]
struct Target {
    /// Policies of the services it serves.
    policies: Vec<Option<Authorization>>,
    /// Its inbound series, labelled with the first service it serves;
    /// shared with the streams, so a stream copies no labels.
    series: Arc<EndpointSeries>,
}

/// What inbound checks need from the state.
#[derive(Debug, Default)]
pub struct Inbound {
    trust_domain: String,
    /// Enrolled workloads of this node.
    local: HashSet<Ipv4Addr>,
    targets: HashMap<SocketAddrV4, Target>,
}

impl Inbound {
    pub fn build(state: &State, node: &NodeName, trust_domain: &str, metrics: &Metrics) -> Self {
        let local = state.workloads.iter().filter(|w| &w.node == node).map(|w| w.ip).collect();
        let mut targets: HashMap<SocketAddrV4, Target> = HashMap::new();
        for s in &state.services {
            for p in &s.ports {
                for e in s.endpoints.iter().filter(|e| &e.node == node) {
                    let addr = e.addr(p.target_port);
                    let t = targets.entry(addr).or_insert_with(|| Target {
                        policies: Vec::new(),
                        series: Arc::new(metrics.endpoint_series(ConnLabels {
                            service: format!("{}:{}", s.key(), p.port),
                            endpoint: addr.to_string(),
                            direction: "inbound",
                        })),
                    });
                    t.policies.push(s.authorization.clone());
                }
            }
        }
        Self { trust_domain: trust_domain.to_owned(), local, targets }
    }

    /// Drops from `metrics` the series of this view that `next` has not.
    pub fn forget_series_missing_from(&self, next: &Inbound, metrics: &Metrics) {
        let kept: HashSet<&ConnLabels> = next.targets.values().map(|t| &t.series.labels).collect();
        for t in self.targets.values().filter(|t| !kept.contains(&t.series.labels)) {
            metrics.forget_endpoint(&t.series.labels);
        }
    }

    /// Whether `peer` may reach `target`: allowed by a service `target`
    /// serves, or (serving none) of this trust domain.
    fn allows(&self, target: SocketAddrV4, peer: &Identity) -> bool {
        match self.targets.get(&target) {
            Some(t) => t.policies.iter().any(|p| Authorization::allows(p.as_ref(), &self.trust_domain, peer)),
            None => Authorization::allows(None, &self.trust_domain, peer),
        }
    }
}

pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    inbound: Arc<ArcSwap<Inbound>>,
    counters: Arc<TunnelCounters>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "tunnel accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let (acceptor, inbound, counters) = (acceptor.clone(), inbound.clone(), counters.clone());
        tokio::spawn(async move { connection(tcp, peer, acceptor, inbound, counters).await });
    }
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    inbound: Arc<ArcSwap<Inbound>>,
    counters: Arc<TunnelCounters>,
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
    let svc = hyper::service::service_fn(move |req| {
        let (id, inbound, counters) = (id.clone(), inbound.clone(), counters.clone());
        async move { Ok::<_, Infallible>(stream(req, &id, &inbound.load(), &counters).await) }
    });
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .max_frame_size(super::MAX_FRAME_SIZE)
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10));
    if let Err(e) = builder.serve_connection(TokioIo::new(tls), svc).await {
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
) -> Response<Empty<Bytes>> {
    let target = req.uri().authority().and_then(|a| a.as_str().parse::<SocketAddrV4>().ok());
    let (true, Some(target)) = (req.method() == Method::CONNECT, target) else {
        TunnelCounters::inc(&counters.bad_requests);
        warn!(identity = %peer, method = %req.method(), uri = %req.uri(), "tunnel request is not CONNECT ip:port; refused");
        return status(StatusCode::BAD_REQUEST);
    };
    if !inbound.local.contains(target.ip()) {
        TunnelCounters::inc(&counters.denied_not_local);
        warn!(identity = %peer, %target, "CONNECT to an address that is not a workload of this node; refused (403)");
        return status(StatusCode::FORBIDDEN);
    }
    if !inbound.allows(target, peer) {
        TunnelCounters::inc(&counters.denied_policy);
        warn!(identity = %peer, %target, "authorization policy does not allow this identity; refused (403)");
        return status(StatusCode::FORBIDDEN);
    }
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
    let peer = peer.clone();
    let series = inbound.targets.get(&target).map(|t| t.series.clone());
    tokio::spawn(async move {
        let started = tokio::time::Instant::now();
        let mut up = match hyper::upgrade::on(req).await {
            Ok(up) => TokioIo::new(up),
            Err(e) => {
                debug!(identity = %peer, %target, error = %e, "tunnel stream upgrade failed");
                return;
            }
        };
        if let Some(s) = &series {
            s.opened.inc();
        }
        let mut upstream = upstream;
        let Transfer { up: bytes_in, down: bytes_out, error } = relay(&mut up, &mut upstream).await;
        let duration_ms = started.elapsed().as_millis() as u64;
        if let Some(s) = &series {
            s.closed.inc();
            s.sent.inc_by(bytes_in);
            s.received.inc_by(bytes_out);
        }
        let service = series.as_ref().map(|s| s.labels.service.as_str()).unwrap_or("");
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
