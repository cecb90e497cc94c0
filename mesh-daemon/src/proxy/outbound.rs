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
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::error::ConnectError;
use super::relay::{self, Transfer};
use super::{Route, RouteEndpoint, RouteTable, Workload};
use crate::balance::backoff::Backoff;
use crate::datapath::OrigDstReader;
use crate::drain::Drain;
use crate::telemetry::ProxyCounters;
use crate::tunnel::client::{Pool, Stream};

pub struct Outbound {
    /// Set TCP_NODELAY on it: accepted sockets inherit it, one call fewer per connection.
    pub listener: TcpListener,
    pub orig: OrigDstReader,
    pub routes: Arc<ArcSwap<RouteTable>>,
    pub counters: Arc<ProxyCounters>,
    /// None: no certificates, so no tunnel.
    pub tunnel: Option<Arc<Pool>>,
}

/// The upstream side of a forwarded connection.
enum Upstream {
    /// An endpoint on this node, or one reached without mTLS: spliced.
    Tcp(TcpStream),
    /// A stream of the mTLS tunnel to the endpoint's node: copied.
    Tunnel(Box<Stream>),
}

impl Outbound {
    /// Accepts until the drain starts; each forwarded connection holds a
    /// drain guard until it closes.
    pub async fn run(self, drain: Drain) {
        let Outbound { listener, mut orig, routes, counters, tunnel } = self;
        let guards = drain.clone();
        crate::drain::accept_loop(listener, "outbound", drain, move |client, peer| {
            counters.accepted.inc();
            let SocketAddr::V4(peer) = peer else {
                counters.no_orig_dst.inc();
                return;
            };
            // Read in the accept loop: it owns the map handle, and the entry
            // must be gone before the client's port can be reused.
            let Some(orig) = orig.take(peer) else {
                counters.no_orig_dst.inc();
                warn!(client = %peer, "connection without a recorded original destination; closed");
                return;
            };
            let table = routes.load();
            let Some(route) = table.route(orig.service_id).cloned() else {
                counters.no_route.inc();
                warn!(client = %peer, service_id = orig.service_id, "original destination is no longer a service; closed");
                return;
            };
            let source = table.workload(*peer.ip()).cloned();
            let (counters, tunnel, guard) = (counters.clone(), tunnel.clone(), guards.guard());
            tokio::spawn(async move {
                forward(client, peer, source.as_deref(), &route, &counters, tunnel.as_deref()).await;
                drop(guard);
            });
        })
        .await;
    }
}

/// Backoff between connect tries: 10 ms doubling to 500 ms, jitter 0.5.
const RETRY_BACKOFF: Backoff =
    Backoff { base: Duration::from_millis(10), max: Duration::from_millis(500), jitter: 0.5 };

/// One connect try to one endpoint: plain TCP, or a tunnel stream.
async fn open(
    ep: &RouteEndpoint,
    route: &Route,
    source: Option<&Workload>,
    tunnel: Option<&Pool>,
) -> Result<Upstream, ConnectError> {
    let addr = ep.state.addr;
    let after = route.connect_timeout;
    match (&ep.remote, route.mtls) {
        (Some((node, tunnel_addr)), true) => {
            let pool = tunnel.ok_or_else(|| ConnectError::NoCertificates { addr, node: node.clone() })?;
            let id = &source.ok_or_else(|| ConnectError::NoIdentity { addr, node: node.clone() })?.identity;
            let s = tokio::time::timeout(after, pool.connect(id, node, *tunnel_addr, addr, &route.service))
                .await
                .map_err(|_| ConnectError::Timeout { addr, after })?
                .map_err(|source| ConnectError::Tunnel { addr, source })?;
            Ok(Upstream::Tunnel(Box::new(s)))
        }
        _ => {
            let s = tokio::time::timeout(after, TcpStream::connect(addr))
                .await
                .map_err(|_| ConnectError::Timeout { addr, after })?
                .map_err(|source| ConnectError::Io { addr, source })?;
            let _ = s.set_nodelay(true);
            Ok(Upstream::Tcp(s))
        }
    }
}

/// Connects to an endpoint of `route`. A failure of the endpoint (see
/// [`ConnectError::counts_against_endpoint`]) feeds its breaker and is
/// retried on another endpoint after a backoff, up to the route's retry
/// count and budget; any other failure ends the connection at once.
async fn connect<'r>(
    route: &'r Route,
    source: Option<&Workload>,
    counters: &ProxyCounters,
    tunnel: Option<&Pool>,
) -> Result<(Upstream, &'r RouteEndpoint, Duration), ConnectError> {
    let start = Instant::now();
    let mut tried = Vec::new();
    let mut last = ConnectError::NoEndpoint;
    for attempt in 0..=route.retries {
        let Some(ep) = route.pick(&tried, Instant::now()) else { break };
        let t0 = Instant::now();
        match open(ep, route, source, tunnel).await {
            Ok(s) => {
                let rtt = t0.elapsed();
                ep.state.connected(rtt, Instant::now());
                ep.series.connect_latency.observe(rtt.as_secs_f64());
                return Ok((s, ep, rtt));
            }
            Err(e) if !e.counts_against_endpoint() => {
                // A probe this connection claimed is given back untested.
                ep.state.release_probe();
                return Err(e);
            }
            Err(e) => last = e,
        }
        if ep.state.failed(Instant::now()) {
            ep.series.ejections.inc();
        }
        tried.push(ep.state.addr);
        let pause = RETRY_BACKOFF.delay(attempt, fastrand::f64());
        if attempt == route.retries || start.elapsed() + pause >= route.retry_budget {
            break;
        }
        counters.retries.inc();
        route.series.retries.inc();
        debug!(service = %route.name, error = %last, attempt, "connect failed; trying another endpoint");
        tokio::time::sleep(pause).await;
    }
    Err(last)
}

async fn forward(
    mut client: TcpStream,
    peer: SocketAddrV4,
    source: Option<&Workload>,
    route: &Route,
    counters: &ProxyCounters,
    tunnel: Option<&Pool>,
) {
    let src = source.map_or("unknown", |w| w.name.as_str());
    let identity = source.map(|w| &w.identity);
    let started = Instant::now();
    let (upstream, ep, rtt) = match connect(route, source, counters, tunnel).await {
        Ok(c) => c,
        Err(e) => {
            let outcome = e.reason();
            if e.counts_against_endpoint() || outcome == "no_endpoint" {
                counters.connect_failed.inc();
                route.series.failed.inc();
                warn!(client = %peer, source = src, service = %route.name, error = %e, "no endpoint could be reached; closed");
            } else {
                counters.refused.inc();
                warn!(client = %peer, source = src, service = %route.name, error = %e, outcome, "connection refused; closed, not retried");
            }
            info!(target: "access", source = src, identity = identity.map(tracing::field::display), client = %peer, service = %route.name, outcome, error = %e, duration_ms = started.elapsed().as_millis() as u64, "closed");
            return;
        }
    };
    let endpoint = ep.state.addr;
    let series = &ep.series;
    series.opened.inc();
    let _in_flight = ep.state.start();
    counters.forwarded.inc();
    counters.active.inc();
    debug!(client = %peer, source = src, service = %route.name, %endpoint, connect_ms = rtt.as_secs_f64() * 1000.0, "forwarding");
    let Transfer { up, down, error } = match upstream {
        Upstream::Tcp(mut up) => relay::relay(&mut client, &mut up).await,
        Upstream::Tunnel(mut up) => relay::relay(&mut client, &mut *up).await,
    };
    counters.active.dec();
    counters.bytes_to_endpoint.add(up);
    counters.bytes_to_client.add(down);
    series.closed.inc();
    series.sent.inc_by(up);
    series.received.inc_by(down);
    let duration = started.elapsed();
    route.series.duration.observe(duration.as_secs_f64());
    let duration_ms = duration.as_millis() as u64;
    let node = ep.node.as_str();
    match error {
        None => {
            info!(target: "access", source = src, identity = identity.map(tracing::field::display), client = %peer, service = %route.name, %endpoint, node, bytes_up = up, bytes_down = down, duration_ms, outcome = "ok", "closed");
        }
        Some(e) => {
            counters.io_errors.inc();
            if e.kind() == std::io::ErrorKind::ConnectionReset && ep.state.failed(Instant::now()) {
                series.ejections.inc();
            }
            info!(target: "access", source = src, identity = identity.map(tracing::field::display), client = %peer, service = %route.name, %endpoint, node, bytes_up = up, bytes_down = down, duration_ms, outcome = "error", error = %e, "closed");
        }
    }
}
