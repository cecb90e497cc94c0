//! The outbound listener: connections that connect4 redirected from
//! enrolled pods. Each one is matched to the service the client dialled
//! (recorded by the kernel), sent to an endpoint, and its bytes copied both
//! ways with half-close kept.

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use tokio::time::Instant;

use super::{Route, RouteTable};
use crate::balance::backoff::Backoff;
use crate::balance::EndpointState;
use crate::datapath::OrigDstReader;
use crate::telemetry::ProxyCounters;

pub struct Outbound {
    pub listener: TcpListener,
    pub orig: OrigDstReader,
    pub routes: Arc<ArcSwap<RouteTable>>,
    pub counters: Arc<ProxyCounters>,
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
            let source = routes.workload(*peer.ip()).unwrap_or("unknown").to_owned();
            let counters = self.counters.clone();
            tokio::spawn(async move {
                forward(client, peer, &source, &route, &counters).await;
            });
        }
    }
}

/// Backoff between connect tries: 10 ms doubling to 500 ms, jitter 0.5.
const RETRY_BACKOFF: Backoff =
    Backoff { base: Duration::from_millis(10), max: Duration::from_millis(500), jitter: 0.5 };

/// Connects to an endpoint of `route`: on a refused, unreachable or slow
/// connect, another endpoint is tried after a backoff, up to the route's
/// retry count and budget. Every outcome feeds the endpoint's latency
/// estimate and breaker.
async fn connect(route: &Route, counters: &ProxyCounters) -> Result<(TcpStream, Arc<EndpointState>, Duration), String> {
    let start = Instant::now();
    let mut tried = Vec::new();
    let mut last = String::from("the service has no endpoint");
    for attempt in 0..=route.retries {
        let Some(ep) = route.pick(&tried, Instant::now()) else {
            break;
        };
        let t0 = Instant::now();
        let result = tokio::time::timeout(route.connect_timeout, TcpStream::connect(ep.addr)).await;
        match result {
            Ok(Ok(s)) => {
                let rtt = t0.elapsed();
                ep.connected(rtt, Instant::now());
                return Ok((s, ep, rtt));
            }
            Ok(Err(e)) => last = format!("{}: {e}", ep.addr),
            Err(_) => last = format!("{}: connect timed out after {:?}", ep.addr, route.connect_timeout),
        }
        ep.failed(Instant::now());
        tried.push(ep.addr);
        let pause = RETRY_BACKOFF.delay(attempt, fastrand::f64());
        if attempt == route.retries || start.elapsed() + pause >= route.retry_budget {
            break;
        }
        counters.retries.inc();
        debug!(service = %route.name, error = %last, attempt, "connect failed; trying another endpoint");
        tokio::time::sleep(pause).await;
    }
    Err(last)
}

async fn forward(client: TcpStream, peer: SocketAddrV4, source: &str, route: &Route, counters: &ProxyCounters) {
    let (upstream, ep, rtt) = match connect(route, counters).await {
        Ok(c) => c,
        Err(e) => {
            counters.connect_failed.inc();
            warn!(client = %peer, source, service = %route.name, error = %e, "no endpoint could be reached; closed");
            return;
        }
    };
    let endpoint = ep.addr;
    let _in_flight = ep.start();
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    counters.forwarded.inc();
    counters.active.inc();
    debug!(client = %peer, source, service = %route.name, %endpoint, connect_ms = rtt.as_secs_f64() * 1000.0, "forwarding");
    let (mut client, mut upstream) = (client, upstream);
    let result = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    counters.active.dec();
    match result {
        Ok((up, down)) => {
            counters.bytes_to_endpoint.add(up);
            counters.bytes_to_client.add(down);
            info!(target: "access", source, client = %peer, service = %route.name, %endpoint, bytes_up = up, bytes_down = down, "closed");
        }
        Err(e) => {
            counters.io_errors.inc();
            if e.kind() == std::io::ErrorKind::ConnectionReset {
                ep.failed(Instant::now());
            }
            debug!(client = %peer, service = %route.name, %endpoint, error = %e, "connection ended with an error");
        }
    }
}
