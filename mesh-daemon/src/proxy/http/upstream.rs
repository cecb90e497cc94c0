//! Pooled upstream connections for requests: hyper-util's pooling client
//! (HTTP/1.1 keep-alive, or one multiplexed HTTP/2 connection), one per
//! endpoint, protocol and, through the tunnel, source identity and service.
//! Its connector dials the endpoint whatever the request's authority, so
//! `Host` and `:authority` go upstream as the client sent them.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddrV4;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::identity::Identity;
use crate::model::NodeName;
use crate::proxy::error::ConnectError;
use crate::tunnel::client::{Pool, Stream};

pub type Body = UnsyncBoxBody<Bytes, hyper::Error>;

/// Idle upstream connections kept per endpoint, and for how long.
const MAX_IDLE_PER_ENDPOINT: usize = 32;
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How a connection to one endpoint is made.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dial {
    /// Plain TCP to the endpoint (this node, or `mtls: disabled`).
    Direct(SocketAddrV4),
    /// A stream of the mTLS tunnel to the endpoint's node, as `source`.
    Tunnel { target: SocketAddrV4, node: NodeName, node_addr: SocketAddrV4, source: Identity, service: String },
}

impl Dial {
    pub fn target(&self) -> SocketAddrV4 {
        match self {
            Dial::Direct(a) => *a,
            Dial::Tunnel { target, .. } => *target,
        }
    }
}

#[derive(Clone)]
pub struct Connector {
    dial: Arc<Dial>,
    pool: Option<Arc<Pool>>,
    timeout: Duration,
}

impl Connector {
    pub fn new(dial: Dial, pool: Option<Arc<Pool>>, timeout: Duration) -> Self {
        Self { dial: Arc::new(dial), pool, timeout }
    }
}

/// An upstream connection of either kind, and when it was made.
pub enum Io {
    Tcp(TokioIo<TcpStream>, Instant),
    Tunnel(Box<TokioIo<Stream>>, Instant),
}

/// When the connection a response came over was made (a response
/// extension): a request that had to wait for a new connection does not
/// count the connect in its latency.
#[derive(Debug, Clone, Copy)]
pub struct ConnectedAt(pub Instant);

impl Connection for Io {
    fn connected(&self) -> Connected {
        let (Io::Tcp(_, at) | Io::Tunnel(_, at)) = self;
        Connected::new().extra(ConnectedAt(*at))
    }
}

impl hyper::rt::Read for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s, _) => Pin::new(s).poll_read(cx, buf),
            Io::Tunnel(s, _) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(s, _) => Pin::new(s).poll_write(cx, buf),
            Io::Tunnel(s, _) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s, _) => Pin::new(s).poll_flush(cx),
            Io::Tunnel(s, _) => Pin::new(&mut **s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s, _) => Pin::new(s).poll_shutdown(cx),
            Io::Tunnel(s, _) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = Io;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Io, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let (dial, pool, after) = (self.dial.clone(), self.pool.clone(), self.timeout);
        Box::pin(async move {
            match &*dial {
                Dial::Direct(addr) => {
                    let addr = *addr;
                    let s = tokio::time::timeout(after, TcpStream::connect(addr))
                        .await
                        .map_err(|_| ConnectError::Timeout { addr, after })?
                        .map_err(|source| ConnectError::Io { addr, source })?;
                    let _ = s.set_nodelay(true);
                    Ok(Io::Tcp(TokioIo::new(s), Instant::now()))
                }
                Dial::Tunnel { target, node, node_addr, source, service } => {
                    let addr = *target;
                    let pool = pool.ok_or_else(|| ConnectError::NoCertificates { addr, node: node.clone() })?;
                    let s = tokio::time::timeout(after, pool.connect(source, node, *node_addr, addr, service))
                        .await
                        .map_err(|_| ConnectError::Timeout { addr, after })?
                        .map_err(|source| ConnectError::Tunnel { addr, source })?;
                    Ok(Io::Tunnel(Box::new(TokioIo::new(s)), Instant::now()))
                }
            }
        })
    }
}

/// Upstream clients by (how to dial, HTTP/2 or not); kept across state
/// writes so pools survive an `apply`.
#[derive(Default)]
pub struct Upstreams {
    clients: Mutex<HashMap<(Dial, bool), Client<Connector, Body>>>,
}

impl Upstreams {
    /// The client for `dial`, speaking HTTP/2 with prior knowledge when
    /// `http2`. The lock is held for a lookup, never across an await.
    pub fn client(
        &self,
        dial: Dial,
        http2: bool,
        pool: Option<&Arc<Pool>>,
        connect_timeout: Duration,
    ) -> Client<Connector, Body> {
        let mut m = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        m.entry((dial.clone(), http2))
            .or_insert_with(|| {
                let connector = Connector::new(dial, pool.cloned(), connect_timeout);
                Client::builder(TokioExecutor::new())
                    .pool_timer(TokioTimer::new())
                    .timer(TokioTimer::new())
                    .pool_idle_timeout(IDLE_TIMEOUT)
                    .pool_max_idle_per_host(MAX_IDLE_PER_ENDPOINT)
                    .http2_only(http2)
                    .build(connector)
            })
            .clone()
    }

    /// Forgets the clients of endpoints no longer in use (their pooled
    /// connections close once idle).
    pub fn retain(&self, keep: impl Fn(SocketAddrV4) -> bool) {
        self.clients.lock().unwrap_or_else(|p| p.into_inner()).retain(|(d, _), _| keep(d.target()));
    }
}
