//! The tunnel's outbound side: a pool of HTTP/2 connections, one per
//! (source identity, destination node), each stream one CONNECT.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::debug;

use crate::identity::manager::Certs;
use crate::identity::{tls, Identity};
use crate::model::NodeName;

/// A tunnelled stream: bytes in both directions.
pub type Stream = TokioIo<hyper::upgrade::Upgraded>;

const IDLE: Duration = Duration::from_secs(60);

struct Pooled {
    serial: u64,
    sender: SendRequest<Empty<Bytes>>,
    used: Instant,
}

pub struct Pool {
    certs: Arc<Certs>,
    conns: Mutex<HashMap<(Identity, NodeName), Pooled>>,
}

impl Pool {
    /// Must be called inside the runtime: it starts the idle sweeper.
    pub fn new(certs: Arc<Certs>) -> Arc<Self> {
        let pool = Arc::new(Self { certs, conns: Mutex::new(HashMap::new()) });
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

    /// Drops connections that are closed or idle for longer than a minute;
    /// dropping the last sender closes the connection once its streams end.
    fn sweep(&self) {
        let mut m = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, p| !p.sender.is_closed() && p.used.elapsed() < IDLE);
    }

    /// Opens a stream to `target` on `node` (tunnel at `node_addr`) as
    /// `source`. Errors say what failed, for the proxy's log and retry.
    pub async fn connect(
        &self,
        source: &Identity,
        node: &NodeName,
        node_addr: SocketAddrV4,
        target: SocketAddrV4,
    ) -> Result<Stream, String> {
        let (cert, serial) = self.certs.workload(source).map_err(|e| e.to_string())?;
        let key = (source.clone(), node.clone());
        let reuse = {
            self.sweep();
            let mut m = self.conns.lock().unwrap_or_else(|p| p.into_inner());
            m.get_mut(&key).filter(|p| p.serial == serial && p.sender.is_ready()).map(|p| {
                p.used = Instant::now();
                p.sender.clone()
            })
        };
        let mut sender = match reuse {
            Some(s) => s,
            None => {
                let expected = Identity::node(&self.certs.trust_domain, node);
                let cfg = tls::client_config(cert, self.certs.roots.clone(), expected)?;
                let tcp = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(node_addr))
                    .await
                    .map_err(|_| format!("tunnel to {node} ({node_addr}): connect timed out"))?
                    .map_err(|e| format!("tunnel to {node} ({node_addr}): {e}"))?;
                let _ = tcp.set_nodelay(true);
                let tls = TlsConnector::from(Arc::new(cfg))
                    .connect(ServerName::IpAddress((*node_addr.ip()).into()), tcp)
                    .await
                    .map_err(|e| format!("tunnel to {node} ({node_addr}): TLS: {e}"))?;
                let mut b = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
                b.timer(hyper_util::rt::TokioTimer::new())
                    .max_frame_size(super::MAX_FRAME_SIZE)
                    .keep_alive_interval(Duration::from_secs(20))
                    .keep_alive_timeout(Duration::from_secs(10))
                    .keep_alive_while_idle(true);
                let (sender, conn) =
                    b.handshake(TokioIo::new(tls)).await.map_err(|e| format!("tunnel to {node}: HTTP/2: {e}"))?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(error = %e, "tunnel connection closed");
                    }
                });
                let mut m = self.conns.lock().unwrap_or_else(|p| p.into_inner());
                m.insert(key, Pooled { serial, sender: sender.clone(), used: Instant::now() });
                sender
            }
        };
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| format!("tunnel to {node}: {e}"))?;
        if resp.status() != StatusCode::OK {
            return Err(format!("tunnel to {node}: CONNECT {target} refused with {}", resp.status()));
        }
        let up = hyper::upgrade::on(resp).await.map_err(|e| format!("tunnel to {node}: {e}"))?;
        Ok(TokioIo::new(up))
    }
}
