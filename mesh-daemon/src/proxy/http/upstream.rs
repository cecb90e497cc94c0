//! Pooled upstream connections for requests: hyper-util's pooling client
//! (HTTP/1.1 keep-alive, or one multiplexed HTTP/2 connection), one per
//! endpoint, protocol and, through the tunnel, source identity and service.
//! Its connector dials the endpoint whatever the request's authority, so
//! `Host` and `:authority` go upstream as the client sent them.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
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
use tokio::time::Instant;

use crate::identity::Identity;
use crate::model::{NodeName, ServiceKey};
use crate::proxy::dial::{self, Upstream};
use crate::proxy::error::ConnectError;
use crate::tunnel::client::Pool;
use crate::tunnel::StreamProtocol;

pub type Body = UnsyncBoxBody<Bytes, hyper::Error>;

/// Idle upstream connections kept per endpoint, and for how long.
const MAX_IDLE_PER_ENDPOINT: usize = 32;
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How a connection to one endpoint is made (see [`dial`]): the key of
/// its pool.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dial {
    /// Plain TCP to the endpoint (this node, or `mtls: disabled`).
    Direct(SocketAddr),
    /// A stream of the mTLS tunnel to the endpoint's node, as `source`.
    Tunnel { target: SocketAddr, via: (NodeName, SocketAddr), source: Identity, service: ServiceKey },
}

impl Dial {
    pub fn target(&self) -> SocketAddr {
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
    /// What a tunnel stream will carry: requests in this protocol, or
    /// (None) bytes the receiving node relays as they are.
    protocol: Option<StreamProtocol>,
}

impl Connector {
    pub fn new(dial: Dial, pool: Option<Arc<Pool>>, timeout: Duration, protocol: Option<StreamProtocol>) -> Self {
        Self { dial: Arc::new(dial), pool, timeout, protocol }
    }
}

/// An upstream connection, and when it was made.
pub struct Io {
    inner: TokioIo<Upstream>,
    at: Instant,
}

/// When the connection a response came over was made (a response
/// extension): a request that had to wait for a new connection does not
/// count the connect in its latency.
#[derive(Debug, Clone, Copy)]
pub struct ConnectedAt(pub Instant);

impl Connection for Io {
    fn connected(&self) -> Connected {
        Connected::new().extra(ConnectedAt(self.at))
    }
}

impl hyper::rt::Read for Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Io {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
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
        let (dial, pool, after, protocol) = (self.dial.clone(), self.pool.clone(), self.timeout, self.protocol);
        Box::pin(async move {
            let up = match &*dial {
                Dial::Direct(addr) => dial::direct(*addr, after).await?,
                Dial::Tunnel { target, via, source, service } => {
                    dial::tunnel(*target, via, Some(source), (service, protocol, None), pool.as_deref(), after).await?
                }
            };
            Ok(Io { inner: TokioIo::new(up), at: Instant::now() })
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
                let protocol = if http2 { StreamProtocol::Http2 } else { StreamProtocol::Http1 };
                let connector = Connector::new(dial, pool.cloned(), connect_timeout, Some(protocol));
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
    pub fn retain(&self, keep: impl Fn(SocketAddr) -> bool) {
        self.clients.lock().unwrap_or_else(|p| p.into_inner()).retain(|(d, _), _| keep(d.target()));
    }
}
