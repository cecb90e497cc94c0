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

use super::RouteTable;
use crate::datapath::OrigDstReader;
use crate::telemetry::ProxyCounters;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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

async fn forward(
    client: TcpStream,
    peer: SocketAddrV4,
    source: &str,
    route: &super::Route,
    counters: &ProxyCounters,
) {
    let Some(endpoint) = route.pick() else {
        counters.no_endpoint.inc();
        warn!(client = %peer, source, service = %route.name, "service has no endpoint; closed");
        return;
    };
    let upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(endpoint)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            counters.connect_failed.inc();
            warn!(client = %peer, source, service = %route.name, %endpoint, error = %e, "connect to endpoint failed");
            return;
        }
        Err(_) => {
            counters.connect_failed.inc();
            warn!(client = %peer, source, service = %route.name, %endpoint, "connect to endpoint timed out");
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    counters.forwarded.inc();
    counters.active.inc();
    debug!(client = %peer, source, service = %route.name, %endpoint, "forwarding");
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
            debug!(client = %peer, service = %route.name, %endpoint, error = %e, "connection ended with an error");
        }
    }
}
