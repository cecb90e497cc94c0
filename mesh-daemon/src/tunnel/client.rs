//! The tunnel's outbound side: a pool of HTTP/2 connections, one per
//! (source identity, destination node), each stream one CONNECT.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper::header::HeaderValue;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::debug;

use crate::identity::manager::Certs;
use crate::identity::tls::SwapCert;
use crate::identity::{tls, Identity};
use crate::model::{NodeName, ServiceKey};

/// A tunnelled stream: bytes in both directions.
pub type Stream = TokioIo<hyper::upgrade::Upgraded>;

impl crate::relay::Side for Stream {}

/// Why a tunnel stream could not be opened. Which of these count against
/// the endpoint is the proxy's decision (`proxy::ConnectError`).
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// This node cannot present the source's identity.
    #[error("no certificate for {identity}: {message}")]
    Certificate { identity: Identity, message: String },
    #[error("tunnel to {node} ({addr}): connect timed out")]
    ConnectTimeout { node: NodeName, addr: SocketAddr },
    #[error("tunnel to {node} ({addr}): {source}")]
    Connect { node: NodeName, addr: SocketAddr, source: std::io::Error },
    #[error("tunnel to {node} ({addr}): TLS handshake: {source}")]
    Handshake { node: NodeName, addr: SocketAddr, source: std::io::Error },
    #[error("tunnel to {node}: HTTP/2: {source}")]
    Http2 { node: NodeName, source: hyper::Error },
    /// The remote node answered the CONNECT with another status than 200;
    /// `reason` is its `mesh-deny` header, when it refused by policy.
    #[error("tunnel to {node}: CONNECT {target} refused with {status}{}", reason.as_ref().map(|r| format!(" ({r})")).unwrap_or_default())]
    Refused { node: NodeName, target: SocketAddr, status: StatusCode, reason: Option<String> },
}

const IDLE: Duration = Duration::from_secs(60);

struct Pooled {
    serial: u64,
    sender: SendRequest<Empty<Bytes>>,
    used: Instant,
}

/// One (source identity, destination node): its connection, behind an
/// async lock that makes racing connects wait for one handshake.
type Slot = Arc<tokio::sync::Mutex<Option<Pooled>>>;

pub struct Pool {
    certs: Arc<Certs>,
    /// Held only to find or add a slot: O(1), never across an await.
    slots: Mutex<HashMap<(Identity, NodeName), Slot>>,
}

impl Pool {
    /// Must be called inside the runtime: it starts the idle sweeper.
    pub fn new(certs: Arc<Certs>) -> Arc<Self> {
        let pool = Arc::new(Self { certs, slots: Mutex::new(HashMap::new()) });
        let weak = Arc::downgrade(&pool);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(IDLE / 4).await;
                let Some(pool) = weak.upgrade() else { return };
                pool.sweep();
            }
        });
        pool
    }

    /// Drops connections that are closed or idle for longer than a minute
    /// (dropping the last sender closes one once its streams end), and
    /// their slots. Slots in use right now are left for the next sweep.
    fn sweep(&self) {
        let mut m = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, slot| match slot.try_lock() {
            Ok(mut g) => {
                if g.as_ref().is_some_and(|p| p.sender.is_closed() || p.used.elapsed() >= IDLE) {
                    *g = None;
                }
                g.is_some()
            }
            Err(_) => true,
        });
    }

    fn slot(&self, key: (Identity, NodeName)) -> Slot {
        let mut m = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(key).or_default().clone()
    }

    /// The client certificate of `source`, issued the first time (one
    /// request however many connections race for it).
    async fn cert(&self, source: &Identity) -> Result<(Arc<SwapCert>, u64), TunnelError> {
        self.certs
            .workload(source)
            .await
            .map_err(|e| TunnelError::Certificate { identity: source.clone(), message: e.to_string() })
    }

    /// Opens a stream to `target` on `node` (tunnel at `node_addr`) as
    /// `source`, for `service` (`namespace/name`): the receiving node lets
    /// the stream through only to an endpoint of that service whose
    /// policy allows `source`. `protocol` says the stream carries requests.
    pub async fn connect(
        &self,
        source: &Identity,
        node: &NodeName,
        node_addr: SocketAddr,
        target: SocketAddr,
        (service, protocol, client): (&ServiceKey, Option<super::StreamProtocol>, Option<std::net::IpAddr>),
    ) -> Result<Stream, TunnelError> {
        let (cert, serial) = self.cert(source).await?;
        let slot = self.slot((source.clone(), node.clone()));
        let (mut sender, reused) = {
            let mut pooled = slot.lock().await;
            match pooled.as_mut().filter(|p| p.serial == serial && p.sender.is_ready()) {
                Some(p) => {
                    p.used = Instant::now();
                    (p.sender.clone(), true)
                }
                // The lock is held through the handshake: connects that
                // race for this node wait for it and share it.
                None => (self.pool_new(&mut pooled, source, cert.clone(), serial, node, node_addr).await?, false),
            }
        };
        let request = || -> Result<Request<Empty<Bytes>>, TunnelError> {
            let mut req = Request::new(Empty::new());
            *req.method_mut() = Method::CONNECT;
            *req.uri_mut() = hyper::Uri::from_maybe_shared(Bytes::from(target.to_string())).map_err(|_| {
                TunnelError::Refused { node: node.clone(), target, status: StatusCode::BAD_REQUEST, reason: None }
            })?;
            // Names are validated DNS labels: always a valid header value
            // (made from the one string formatted, not copied again).
            if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(service.to_string())) {
                req.headers_mut().insert(super::SERVICE_HEADER, v);
            }
            if let Some(p) = protocol {
                req.headers_mut().insert(super::PROTOCOL_HEADER, HeaderValue::from_static(p.as_str()));
            }
            if let Some(ip) = client.and_then(|ip| HeaderValue::from_str(&ip.to_string()).ok()) {
                req.headers_mut().insert(super::SOURCE_HEADER, ip);
            }
            Ok(req)
        };
        let http2 = |source| TunnelError::Http2 { node: node.clone(), source };
        let resp = match sender.send_request(request()?).await {
            Ok(resp) => resp,
            // A pooled connection the peer closed meanwhile (a GOAWAY from
            // a daemon that hands over and drains, a restart): the stream
            // was not answered, so it opens on a new connection, once.
            Err(e) if reused => {
                debug!(node = %node, error = %e, "pooled tunnel connection went away; opening another");
                sender = self.pool_new(&mut *slot.lock().await, source, cert, serial, node, node_addr).await?;
                sender.send_request(request()?).await.map_err(http2)?
            }
            Err(e) => return Err(http2(e)),
        };
        if resp.status() != StatusCode::OK {
            let reason = resp.headers().get(super::DENY_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
            return Err(TunnelError::Refused { node: node.clone(), target, status: resp.status(), reason });
        }
        let up = hyper::upgrade::on(resp).await.map_err(http2)?;
        Ok(TokioIo::new(up))
    }

    /// A new connection ([`Self::handshake`]) that becomes `pooled`.
    async fn pool_new(
        &self,
        pooled: &mut Option<Pooled>,
        source: &Identity,
        cert: Arc<SwapCert>,
        serial: u64,
        node: &NodeName,
        node_addr: SocketAddr,
    ) -> Result<SendRequest<Empty<Bytes>>, TunnelError> {
        let sender = self.handshake(source, cert, node, node_addr).await?;
        *pooled = Some(Pooled { serial, sender: sender.clone(), used: Instant::now() });
        Ok(sender)
    }

    /// A new HTTP/2 connection over TLS to `node`'s tunnel, presenting
    /// `source`'s certificate `cert`.
    async fn handshake(
        &self,
        source: &Identity,
        cert: Arc<SwapCert>,
        node: &NodeName,
        node_addr: SocketAddr,
    ) -> Result<SendRequest<Empty<Bytes>>, TunnelError> {
        let expected = Identity::node(&self.certs.trust_domain, node);
        let cert_err = |message: String| TunnelError::Certificate { identity: source.clone(), message };
        let cfg = tls::client_config(cert, self.certs.roots.clone(), expected).map_err(|e| cert_err(e.to_string()))?;
        let (node_name, addr) = (node.clone(), node_addr);
        let tcp = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(node_addr))
            .await
            .map_err(|_| TunnelError::ConnectTimeout { node: node_name.clone(), addr })?
            .map_err(|source| TunnelError::Connect { node: node_name.clone(), addr, source })?;
        let _ = tcp.set_nodelay(true);
        let tls = TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::IpAddress(node_addr.ip().into()), tcp)
            .await
            .map_err(|source| TunnelError::Handshake { node: node_name, addr, source })?;
        let mut b = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
        b.timer(hyper_util::rt::TokioTimer::new())
            .max_frame_size(super::MAX_FRAME_SIZE)
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        let (sender, conn) =
            b.handshake(TokioIo::new(tls)).await.map_err(|source| TunnelError::Http2 { node: node.clone(), source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "tunnel connection closed");
            }
        });
        Ok(sender)
    }
}
