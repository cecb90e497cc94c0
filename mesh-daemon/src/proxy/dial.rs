//! How the proxy reaches an endpoint, for connections and requests alike:
//! plain TCP to an endpoint on this node (or of an `mtls: disabled`
//! service), else a stream of the mTLS tunnel to the endpoint's node, as
//! the client's workload identity, naming the service.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::error::ConnectError;
use super::{Route, RouteEndpoint};
use crate::identity::Identity;
use crate::model::{NodeName, ServiceKey};
use crate::relay::Side;
use crate::tunnel::client::{Pool, Stream};
use crate::tunnel::StreamProtocol;

/// A connection to an endpoint.
pub enum Upstream {
    /// An endpoint on this node, or one reached without mTLS: spliced.
    Tcp(TcpStream),
    /// A stream of the mTLS tunnel to the endpoint's node: copied.
    Tunnel(Box<Stream>),
}

impl Upstream {
    fn io(self: Pin<&mut Self>) -> Pin<&mut (dyn AsyncReadWrite + Send)> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s),
            Upstream::Tunnel(s) => Pin::new(&mut **s),
        }
    }
}

trait AsyncReadWrite: AsyncRead + AsyncWrite + Unpin {}
impl<T: AsyncRead + AsyncWrite + Unpin> AsyncReadWrite for T {}

impl AsyncRead for Upstream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.io().poll_read(cx, buf)
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.io().poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io().poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io().poll_shutdown(cx)
    }
}

impl Side for Upstream {
    /// Plain TCP is spliced; a tunnel stream is copied.
    fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Upstream::Tcp(s) => Some(s),
            Upstream::Tunnel(_) => None,
        }
    }
}

/// The endpoint's node and its tunnel address, when `ep` of `route` is
/// reached through the tunnel.
pub fn via<'r>(ep: &'r RouteEndpoint, route: &Route) -> Option<&'r (NodeName, SocketAddr)> {
    ep.remote.as_ref().filter(|_| route.mtls)
}

/// Connects to `addr`, directly or through the tunnel `via`, within
/// `after`. Through the tunnel the client needs an identity (`source`)
/// and this node certificates (`pool`); `protocol` tells the receiving
/// node the stream carries requests.
pub async fn connect(
    addr: SocketAddr,
    via: Option<&(NodeName, SocketAddr)>,
    source: Option<&Identity>,
    stream: (&ServiceKey, Option<StreamProtocol>, Option<std::net::IpAddr>),
    pool: Option<&Pool>,
    after: Duration,
) -> Result<Upstream, ConnectError> {
    match via {
        // Boxed: the tunnel's dial (a TLS handshake, a pool) is a future
        // of some kilobytes, which every direct connect would carry too.
        Some(via) => Box::pin(tunnel(addr, via, source, stream, pool, after)).await,
        None => direct(addr, after).await,
    }
}

/// A TCP connection to `addr` on this node, within `after`.
pub async fn direct(addr: SocketAddr, after: Duration) -> Result<Upstream, ConnectError> {
    let s = tokio::time::timeout(after, TcpStream::connect(addr))
        .await
        .map_err(|_| ConnectError::Timeout { addr, after })?
        .map_err(|source| ConnectError::Io { addr, source })?;
    let _ = s.set_nodelay(true);
    Ok(Upstream::Tcp(s))
}

/// A tunnel stream to `addr` on node `via`, as `source`, for `service`
/// (carrying requests in `protocol`, or one connection of the client at
/// `client`, which the receiving node's policies may name).
pub async fn tunnel(
    addr: SocketAddr,
    (node, node_addr): &(NodeName, SocketAddr),
    source: Option<&Identity>,
    (service, protocol, client): (&ServiceKey, Option<StreamProtocol>, Option<std::net::IpAddr>),
    pool: Option<&Pool>,
    after: Duration,
) -> Result<Upstream, ConnectError> {
    let pool = pool.ok_or_else(|| ConnectError::NoCertificates { addr, node: node.clone() })?;
    let id = source.ok_or_else(|| ConnectError::NoIdentity { addr, node: node.clone() })?;
    let s = tokio::time::timeout(after, pool.connect(id, node, *node_addr, addr, (service, protocol, client)))
        .await
        .map_err(|_| ConnectError::Timeout { addr, after })?
        .map_err(|source| ConnectError::Tunnel { addr, source })?;
    Ok(Upstream::Tunnel(Box::new(s)))
}
