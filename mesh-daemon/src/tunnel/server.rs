//! The tunnel's receiving side, a transport only: TLS with the peer's
//! certificate checked, HTTP/2, and per CONNECT a [`StreamRequest`] (peer
//! identity, target, service) handed to a [`StreamHandler`], which decides,
//! connects and carries the bytes (`proxy::inbound`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::client::Stream;
use super::TunnelCounters;
use crate::drain::Drain;
use crate::identity::tls::identity_of;
use crate::identity::Identity;

/// One CONNECT as the receiving node sees it.
#[derive(Debug, Clone)]
pub struct StreamRequest {
    /// The SPIFFE ID of the peer's verified certificate.
    pub peer: Arc<Identity>,
    pub target: SocketAddr,
    /// The `mesh-service` header, when there is one.
    pub service: Option<String>,
    /// The `mesh-protocol` header: the stream carries requests.
    pub protocol: Option<super::StreamProtocol>,
    /// Where the tunnel connection came from (the sending node's address,
    /// when nothing rewrote it).
    pub from: std::net::IpAddr,
    /// The `mesh-source` header: the client's address, as the sending
    /// node says (to be checked against the peer's workloads).
    pub source: Option<std::net::IpAddr>,
}

/// Why a CONNECT is not let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Refused by the receiving node (403), with the `mesh-deny` reason.
    Denied(&'static str),
    /// The target did not take the connection (502).
    Unreachable,
    /// The target did not answer the connect in time (504).
    TimedOut,
}

impl Refusal {
    /// The CONNECT's answer.
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::Denied(_) => StatusCode::FORBIDDEN,
            Refusal::Unreachable => StatusCode::BAD_GATEWAY,
            Refusal::TimedOut => StatusCode::GATEWAY_TIMEOUT,
        }
    }
}

/// What happens to a stream: decided and connected in [`open`] before
/// the CONNECT is answered, carried in [`carry`] once it is upgraded.
///
/// [`open`]: StreamHandler::open
/// [`carry`]: StreamHandler::carry
pub trait StreamHandler: Send + Sync + 'static {
    type Upstream: Send + 'static;
    fn open(&self, req: &StreamRequest) -> impl Future<Output = Result<Self::Upstream, Refusal>> + Send;
    fn carry(&self, req: StreamRequest, upstream: Self::Upstream, stream: Stream) -> impl Future<Output = ()> + Send;
}

/// Streams one tunnel connection may carry at once (HTTP/2
/// SETTINGS_MAX_CONCURRENT_STREAMS); a sending node opens another
/// connection beyond it.
pub const STREAMS_PER_CONNECTION: u32 = 1024;

/// What one peer identity (a node, or a workload of a node) may hold open
/// on this node's tunnel: a peer past them is refused, the others are not
/// held up by it.
#[derive(Debug, Clone, Copy)]
pub struct PeerLimits {
    pub connections: usize,
    pub streams: usize,
}

/// Connections and streams open per peer identity.
#[derive(Debug)]
pub struct PerPeer {
    limits: PeerLimits,
    open: Mutex<HashMap<Arc<Identity>, (usize, usize)>>,
}

/// One connection or stream of a peer, counted until dropped.
#[derive(Debug)]
pub struct PeerSlot {
    per: Arc<PerPeer>,
    id: Arc<Identity>,
    stream: bool,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.per.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.id) {
            let count = if self.stream { &mut n.1 } else { &mut n.0 };
            *count = count.saturating_sub(1);
            if *n == (0, 0) {
                open.remove(&self.id);
            }
        }
    }
}

impl PerPeer {
    pub fn new(limits: PeerLimits) -> Arc<Self> {
        Arc::new(Self { limits, open: Mutex::new(HashMap::new()) })
    }

    /// A slot for one more connection (`stream`: false) or stream of `id`;
    /// None past its limit.
    pub fn take(self: &Arc<Self>, id: &Arc<Identity>, stream: bool) -> Option<PeerSlot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(id.clone()).or_default();
        let (count, max) = if stream { (&mut n.1, self.limits.streams) } else { (&mut n.0, self.limits.connections) };
        if *count >= max {
            if *n == (0, 0) {
                open.remove(id);
            }
            return None;
        }
        *count += 1;
        Some(PeerSlot { per: self.clone(), id: id.clone(), stream })
    }

    /// (connections, streams) open for `id`.
    #[cfg(test)]
    pub fn open(&self, id: &Identity) -> (usize, usize) {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).get(id).copied().unwrap_or_default()
    }
}

/// Serves the tunnel on `listener` (a socket, or one per family).
pub async fn serve<H: StreamHandler, L: crate::drain::Listener<Io = TcpStream, Addr = SocketAddr>>(
    listener: L,
    acceptor: TlsAcceptor,
    handler: Arc<H>,
    counters: Arc<TunnelCounters>,
    per_peer: Arc<PerPeer>,
    drain: Drain,
) {
    let conns = drain.clone();
    crate::drain::accept_loop(listener, "tunnel", drain, move |tcp, peer| {
        // A peer node's address as the state writes it: IPv4 seen through
        // a dual-stack socket is its IPv4 address.
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let (acceptor, handler, counters, drain) = (acceptor.clone(), handler.clone(), counters.clone(), conns.clone());
        let per_peer = per_peer.clone();
        tokio::spawn(async move { connection(tcp, peer, acceptor, handler, counters, per_peer, drain).await });
    })
    .await;
}

async fn connection<H: StreamHandler>(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    handler: Arc<H>,
    counters: Arc<TunnelCounters>,
    per_peer: Arc<PerPeer>,
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
            counters.tls_failures.inc();
            warn!(%peer, "tunnel handshake timed out");
            return;
        }
    };
    let id = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(identity_of);
    let Some(id) = id else {
        counters.tls_failures.inc();
        warn!(%peer, "tunnel peer certificate has no SPIFFE ID; closed");
        return;
    };
    counters.handshakes.inc();
    let id = Arc::new(id);
    let Some(_slot) = per_peer.take(&id, false) else {
        counters.over_peer_limit.inc();
        warn!(%peer, identity = %id, limit = per_peer.limits.connections, "tunnel connections of this peer at their limit (--tunnel-connections-per-peer); closed");
        return;
    };
    debug!(%peer, identity = %id, "tunnel connection");
    serve_streams(tls, peer, id, handler, counters, per_peer, drain).await;
}

/// HTTP/2 on a connection whose peer is `id` (its TLS verified): each
/// CONNECT becomes a stream for `handler`.
pub(crate) async fn serve_streams<H: StreamHandler, IO>(
    io: IO,
    peer: SocketAddr,
    id: Arc<Identity>,
    handler: Arc<H>,
    counters: Arc<TunnelCounters>,
    per_peer: Arc<PerPeer>,
    drain: Drain,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let streams = drain.clone();
    let svc = hyper::service::service_fn(move |req| {
        let (id, handler, counters, drain) = (id.clone(), handler.clone(), counters.clone(), streams.clone());
        let per_peer = per_peer.clone();
        async move { Ok::<_, Infallible>(stream(req, id, peer.ip(), handler, &counters, &per_peer, &drain).await) }
    });
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .max_frame_size(super::MAX_FRAME_SIZE)
        .max_concurrent_streams(STREAMS_PER_CONNECTION)
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10));
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    // On drain: GOAWAY, so the peer opens no new stream here and the open
    // ones finish.
    let ended = drain.serve(conn, |c| c.graceful_shutdown()).await;
    if let Err(e) = ended {
        debug!(%peer, error = %e, "tunnel connection ended");
    }
}

fn status(code: StatusCode) -> Response<Empty<Bytes>> {
    let mut r = Response::new(Empty::new());
    *r.status_mut() = code;
    r
}

async fn stream<H: StreamHandler>(
    req: Request<hyper::body::Incoming>,
    peer: Arc<Identity>,
    from: std::net::IpAddr,
    handler: Arc<H>,
    counters: &TunnelCounters,
    per_peer: &Arc<PerPeer>,
    drain: &Drain,
) -> Response<Empty<Bytes>> {
    let target = req.uri().authority().and_then(|a| a.as_str().parse::<SocketAddr>().ok());
    let (true, Some(target)) = (req.method() == Method::CONNECT, target) else {
        counters.bad_requests.inc();
        warn!(identity = %peer, method = %req.method(), uri = %req.uri(), "tunnel request is not CONNECT ip:port; refused");
        return status(StatusCode::BAD_REQUEST);
    };
    let service = req.headers().get(super::SERVICE_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let protocol =
        req.headers().get(super::PROTOCOL_HEADER).and_then(|v| v.to_str().ok()).and_then(super::StreamProtocol::parse);
    let Some(slot) = per_peer.take(&peer, true) else {
        counters.over_peer_limit.inc();
        debug!(identity = %peer, %target, limit = per_peer.limits.streams, "tunnel streams of this peer at their limit (--tunnel-streams-per-peer); refused");
        let mut r = status(StatusCode::SERVICE_UNAVAILABLE);
        r.headers_mut().insert(super::DENY_HEADER, hyper::header::HeaderValue::from_static("peer_stream_limit"));
        return r;
    };
    let source = req.headers().get(super::SOURCE_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    let request = StreamRequest { peer, target, service, protocol, from, source };
    let upstream = match handler.open(&request).await {
        Ok(u) => u,
        Err(refusal) => {
            let mut r = status(refusal.status());
            if let Refusal::Denied(reason) = refusal {
                r.headers_mut().insert(super::DENY_HEADER, hyper::header::HeaderValue::from_static(reason));
            }
            return r;
        }
    };
    let guard = drain.guard();
    tokio::spawn(async move {
        let _guard = (guard, slot);
        match hyper::upgrade::on(req).await {
            Ok(up) => handler.carry(request, upstream, TokioIo::new(up)).await,
            Err(e) => {
                debug!(identity = %request.peer, target = %request.target, error = %e, "tunnel stream upgrade failed")
            }
        }
    });
    status(StatusCode::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_at_its_limits_is_refused_and_others_are_not() {
        let per = PerPeer::new(PeerLimits { connections: 2, streams: 3 });
        let a = Arc::new(Identity::parse("spiffe://cluster.local/node/a").unwrap());
        let b = Arc::new(Identity::parse("spiffe://cluster.local/node/b").unwrap());
        let conns: Vec<_> = (0..3).map(|_| per.take(&a, false)).collect();
        assert_eq!(conns.iter().filter(|c| c.is_some()).count(), 2, "two connections, the third refused");
        let streams: Vec<_> = (0..5).filter_map(|_| per.take(&a, true)).collect();
        assert_eq!(streams.len(), 3);
        assert!(per.take(&b, true).is_some() && per.take(&b, false).is_some(), "another peer is not held up");
        assert_eq!(per.open(&a), (2, 3));
        drop(streams);
        assert_eq!(per.open(&a), (2, 0));
        assert!(per.take(&a, true).is_some(), "a slot freed is taken again");
        drop(conns);
        assert_eq!(per.open(&a), (0, 0));
        assert!(per.open.lock().unwrap().is_empty(), "no entry left for peers with nothing open");
    }
}
