//! The outbound listener: connections that connect4 redirected from
//! enrolled pods. Each one is matched to the service the client dialled
//! (recorded by the kernel), sent to an endpoint chosen by the balancer
//! (with retries on other endpoints before the client sees an error), and
//! its bytes copied both ways with half-close kept. An endpoint on another
//! node is reached through the mTLS tunnel as the client's workload
//! identity, unless the service says `mtls: disabled`.

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Route, RouteEndpoint, RouteTable};
use crate::balance::backoff::Backoff;
use crate::datapath::OrigDstReader;
use crate::identity::Identity;
use crate::telemetry::{Metrics, ProxyCounters};
use crate::tunnel::client::Pool;

/// Bytes both ways: a TCP stream or a tunnelled one.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub struct Outbound {
    pub listener: TcpListener,
    pub orig: OrigDstReader,
    pub routes: Arc<ArcSwap<RouteTable>>,
    pub counters: Arc<ProxyCounters>,
    /// None: no certificates, so no tunnel.
    pub tunnel: Option<Arc<Pool>>,
    pub metrics: Arc<Metrics>,
}

/// Who is connecting, for the tunnel and the logs.
struct Source {
    name: String,
    identity: Option<Identity>,
}

impl Outbound {
    /// Accepts until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        loop {
            let accepted = tokio::select! {
                a = self.listener.accept() => a,
                _ = shutdown.changed() => return,
            };
            let (client, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            self.counters.accepted.inc();
            let SocketAddr::V4(peer) = peer else {
                self.counters.no_orig_dst.inc();
                continue;
            };
            // Read in the accept loop: it owns the map handle, and the entry
            // must be gone before the client's port can be reused.
            let Some(orig) = self.orig.take(peer) else {
                self.counters.no_orig_dst.inc();
                warn!(client = %peer, "connection without a recorded original destination; closed");
                continue;
            };
            let routes = self.routes.load();
            let Some(route) = routes.route(orig.service_id).cloned() else {
                self.counters.no_route.inc();
                warn!(client = %peer, service_id = orig.service_id, "original destination is no longer a service; closed");
                continue;
            };
            let source = match routes.workload(*peer.ip()) {
                Some((name, id)) => Source { name: name.clone(), identity: Some(id.clone()) },
                None => Source { name: "unknown".into(), identity: None },
            };
            let ctx =
                Ctx { counters: self.counters.clone(), tunnel: self.tunnel.clone(), metrics: self.metrics.clone() };
            tokio::spawn(async move {
                forward(client, peer, &source, &route, &ctx).await;
            });
        }
    }
}

/// What a forwarded connection reports to.
struct Ctx {
    counters: Arc<ProxyCounters>,
    tunnel: Option<Arc<Pool>>,
    metrics: Arc<Metrics>,
}

/// Backoff between connect tries: 10 ms doubling to 500 ms, jitter 0.5.
const RETRY_BACKOFF: Backoff =
    Backoff { base: Duration::from_millis(10), max: Duration::from_millis(500), jitter: 0.5 };

/// One connect try to one endpoint: plain TCP, or a tunnel stream.
async fn open(
    ep: &RouteEndpoint,
    route: &Route,
    source: &Source,
    tunnel: Option<&Pool>,
) -> Result<Box<dyn Io>, String> {
    let addr = ep.state.addr;
    match (&ep.remote, route.mtls) {
        (Some((node, tunnel_addr)), true) => {
            let pool = tunnel.ok_or_else(|| {
                format!("{addr} is on node {node} and the service requires mTLS, but this daemon has no certificates (--ca-cert, --ca-key, --trust-bundle)")
            })?;
            let id = source.identity.as_ref().ok_or("the client is not an enrolled workload, so it has no identity")?;
            let s = tokio::time::timeout(route.connect_timeout, pool.connect(id, node, *tunnel_addr, addr))
                .await
                .map_err(|_| {
                    format!("{addr} via the tunnel to {node}: timed out after {:?}", route.connect_timeout)
                })??;
            Ok(Box::new(s))
        }
        _ => {
            let s = tokio::time::timeout(route.connect_timeout, TcpStream::connect(addr))
                .await
                .map_err(|_| format!("{addr}: connect timed out after {:?}", route.connect_timeout))?
                .map_err(|e| format!("{addr}: {e}"))?;
            let _ = s.set_nodelay(true);
            Ok(Box::new(s))
        }
    }
}

/// Connects to an endpoint of `route`: on a refused, unreachable or slow
/// connect, another endpoint is tried after a backoff, up to the route's
/// retry count and budget. Every outcome feeds the endpoint's latency
/// estimate and breaker.
async fn connect<'r>(
    route: &'r Route,
    source: &Source,
    ctx: &Ctx,
) -> Result<(Box<dyn Io>, &'r RouteEndpoint, Duration), String> {
    let start = Instant::now();
    let mut tried = Vec::new();
    let mut last = String::from("the service has no endpoint");
    for attempt in 0..=route.retries {
        let Some(ep) = route.pick(&tried, Instant::now()) else { break };
        let t0 = Instant::now();
        match open(ep, route, source, ctx.tunnel.as_deref()).await {
            Ok(s) => {
                let rtt = t0.elapsed();
                ep.state.connected(rtt, Instant::now());
                ctx.metrics.connect_latency.get_or_create(&ep.endpoint_labels).observe(rtt.as_secs_f64());
                return Ok((s, ep, rtt));
            }
            Err(e) => last = e,
        }
        if ep.state.failed(Instant::now()) {
            ctx.metrics.ejections.get_or_create(&ep.endpoint_labels).inc();
        }
        tried.push(ep.state.addr);
        let pause = RETRY_BACKOFF.delay(attempt, fastrand::f64());
        if attempt == route.retries || start.elapsed() + pause >= route.retry_budget {
            break;
        }
        ctx.counters.retries.inc();
        ctx.metrics.retries.get_or_create(&route.service_labels).inc();
        debug!(service = %route.name, error = %last, attempt, "connect failed; trying another endpoint");
        tokio::time::sleep(pause).await;
    }
    Err(last)
}

async fn forward(client: TcpStream, peer: SocketAddrV4, source: &Source, route: &Route, ctx: &Ctx) {
    let src = source.name.as_str();
    let identity = source.identity.as_ref().map(ToString::to_string).unwrap_or_default();
    let started = Instant::now();
    let (mut upstream, ep, rtt) = match connect(route, source, ctx).await {
        Ok(c) => c,
        Err(e) => {
            ctx.counters.connect_failed.inc();
            ctx.metrics.failed.get_or_create(&route.service_labels).inc();
            warn!(client = %peer, source = src, service = %route.name, error = %e, "no endpoint could be reached; closed");
            info!(target: "access", source = src, %identity, client = %peer, service = %route.name, outcome = "no_endpoint", duration_ms = started.elapsed().as_millis() as u64, "closed");
            return;
        }
    };
    let endpoint = ep.state.addr;
    let node = ep.node.as_str();
    let labels = &ep.labels;
    ctx.metrics.opened.get_or_create(labels).inc();
    let _in_flight = ep.state.start();
    let _ = client.set_nodelay(true);
    ctx.counters.forwarded.inc();
    ctx.counters.active.inc();
    debug!(client = %peer, source = src, service = %route.name, %endpoint, connect_ms = rtt.as_secs_f64() * 1000.0, "forwarding");
    let mut client = client;
    let result = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    ctx.counters.active.dec();
    ctx.metrics.closed.get_or_create(labels).inc();
    let duration = started.elapsed();
    ctx.metrics.duration.get_or_create(&route.service_labels).observe(duration.as_secs_f64());
    let duration_ms = duration.as_millis() as u64;
    match result {
        Ok((up, down)) => {
            ctx.counters.bytes_to_endpoint.add(up);
            ctx.counters.bytes_to_client.add(down);
            ctx.metrics.bytes_sent.get_or_create(labels).inc_by(up);
            ctx.metrics.bytes_received.get_or_create(labels).inc_by(down);
            info!(target: "access", source = src, %identity, client = %peer, service = %route.name, %endpoint, %node, bytes_up = up, bytes_down = down, duration_ms, outcome = "ok", "closed");
        }
        Err(e) => {
            ctx.counters.io_errors.inc();
            if e.kind() == std::io::ErrorKind::ConnectionReset && ep.state.failed(Instant::now()) {
                ctx.metrics.ejections.get_or_create(&ep.endpoint_labels).inc();
            }
            info!(target: "access", source = src, %identity, client = %peer, service = %route.name, %endpoint, %node, duration_ms, outcome = "error", error = %e, "closed");
        }
    }
}
