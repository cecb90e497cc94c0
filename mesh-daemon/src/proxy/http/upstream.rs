//! Pooled upstream connections for requests: per endpoint, protocol and,
//! through the tunnel, source identity and service, a queue of HTTP/1.1
//! keep-alive connections (hyper's `client::conn`) or one multiplexed
//! HTTP/2 connection (the `h2` crate, driven directly). A request takes a
//! ready connection (or dials one), hands its request to it and puts it
//! back at once: the connection is ready again when its answer has been
//! read, and no task waits for that. On HTTP/2 the request's own task
//! opens the stream and waits for the answer's head; only the connection
//! has a task of its own (and a request body, its pump), where hyper's
//! client spawned one per request and answered it through a channel.
//! The endpoint is dialled whatever the request's authority, so `Host` and
//! `:authority` go upstream as the client sent them.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper::client::conn::{http1, TrySendError};
use hyper::header::{HeaderValue, HOST};
use hyper::{Request, Response, Uri, Version};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tracing::debug;

use crate::identity::Identity;
use crate::model::{NodeName, ServiceKey};
use crate::proxy::dial::{self, Upstream};
use crate::proxy::error::ConnectError;
use crate::tunnel::client::Pool;
use crate::tunnel::StreamProtocol;

/// A body on its way through the proxy: a client's request body, or an
/// answer's.
pub type Body = UnsyncBoxBody<Bytes, BodyError>;

/// Why a body failed on its way: its connection or stream failed, or was
/// reset. The side it goes to sees it cut short (its HTTP/2 stream reset,
/// its HTTP/1.1 connection closed), never a body that looks whole.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error("the HTTP/2 stream failed: {0}")]
    H2(#[from] h2::Error),
}

/// An endpoint's answer body: hyper's (HTTP/1.1), or an h2 stream's
/// (HTTP/2), read in the task that sends it on.
#[derive(Debug)]
pub enum UpstreamBody {
    Hyper(Incoming),
    H2 {
        recv: h2::RecvStream,
        /// Its data has ended; its trailers (if any) are next.
        data_done: bool,
    },
}

impl From<Incoming> for UpstreamBody {
    fn from(b: Incoming) -> Self {
        UpstreamBody::Hyper(b)
    }
}

impl hyper::body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BodyError>>> {
        use std::task::Poll;
        match self.get_mut() {
            UpstreamBody::Hyper(b) => std::pin::Pin::new(b).poll_frame(cx).map_err(BodyError::from),
            UpstreamBody::H2 { recv, data_done } => {
                if !*data_done {
                    match recv.poll_data(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Some(Ok(d))) => {
                            // Read: the endpoint may send as much again.
                            let _ = recv.flow_control().release_capacity(d.len());
                            return Poll::Ready(Some(Ok(hyper::body::Frame::data(d))));
                        }
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                        Poll::Ready(None) => *data_done = true,
                    }
                }
                match recv.poll_trailers(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Ok(t)) => Poll::Ready(t.map(|t| Ok(hyper::body::Frame::trailers(t)))),
                    Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e.into()))),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Hyper(b) => b.is_end_stream(),
            UpstreamBody::H2 { recv, .. } => recv.is_end_stream(),
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            UpstreamBody::Hyper(b) => b.size_hint(),
            UpstreamBody::H2 { recv, .. } if recv.is_end_stream() => hyper::body::SizeHint::with_exact(0),
            UpstreamBody::H2 { .. } => hyper::body::SizeHint::default(),
        }
    }
}

/// HTTP/1.1 connections kept per endpoint (busy and idle), idle ones past
/// [`MAX_IDLE_PER_ENDPOINT`] or [`IDLE_TIMEOUT`] closed by the sweep (as
/// the HTTP/2 one after [`IDLE_TIMEOUT`] without a request).
const MAX_KEPT_PER_ENDPOINT: usize = 256;
const MAX_IDLE_PER_ENDPOINT: usize = 32;
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const SWEEP_EVERY: Duration = Duration::from_secs(15);

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

    /// A new connection to the endpoint. The connect (TCP, or the
    /// tunnel's TLS and CONNECT) is a large future made once per
    /// connection; boxed here, it adds a pointer to the futures that await
    /// it (a request's, which are copied whole as they are made), not its
    /// own size.
    pub async fn connect(&self) -> Result<Io, ConnectError> {
        let up = Box::pin(async {
            match &*self.dial {
                Dial::Direct(addr) => dial::direct(*addr, self.timeout).await,
                Dial::Tunnel { target, via, source, service } => {
                    let what = (service, self.protocol, None);
                    dial::tunnel(*target, via, Some(source), what, self.pool.as_deref(), self.timeout).await
                }
            }
        })
        .await?;
        Ok(TokioIo::new(up))
    }
}

/// An upstream connection, as hyper reads and writes it.
pub type Io = TokioIo<Upstream>;

/// When the connection a response came over was made, on a response that
/// had to wait for a new connection (a response extension): its latency
/// does not count the connect.
#[derive(Debug, Clone, Copy)]
pub struct ConnectedAt(pub Instant);

/// Why a request got no answer from its endpoint (an upgrade's too).
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection: nothing was sent.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The connection failed the request (it may have been sent).
    #[error("the request to the endpoint failed: {0}")]
    Http(#[from] hyper::Error),
    /// The HTTP/2 connection failed the request.
    #[error("the request to the endpoint failed: {0}")]
    H2(#[from] h2::Error),
}

/// A request that got no answer: why, and the request as it came when no
/// connection could be had for it (none of it was sent; boxed, so that
/// the futures that await a send stay small).
pub struct Failed {
    pub error: SendError,
    pub unsent: Option<Box<Request<Body>>>,
}

impl From<SendError> for Failed {
    fn from(error: SendError) -> Self {
        Self { error, unsent: None }
    }
}

impl From<h2::Error> for Failed {
    fn from(e: h2::Error) -> Self {
        SendError::H2(e).into()
    }
}

/// A pooled HTTP/1.1 connection, and the sweep it was last handed back in.
struct Kept {
    tx: http1::SendRequest<Body>,
    sweep: u32,
}

/// The connections to one endpoint in one protocol: what a route's
/// endpoint holds to send its requests.
pub struct Endpoint {
    connector: Connector,
    conns: Conns,
    /// Sweeps so far: connections are idle by how many passed since their
    /// last request, so no request reads the clock for them.
    sweeps: AtomicU32,
}

enum Conns {
    /// Ready and busy connections, oldest first.
    Http1(Mutex<VecDeque<Kept>>),
    Http2 {
        /// The connection every request shares, and when it was made.
        shared: Mutex<Option<(h2::client::SendRequest<Bytes>, Instant)>>,
        /// Held while one request dials for all.
        dialling: tokio::sync::Mutex<()>,
        /// The sweep of the last request.
        used: AtomicU32,
    },
}

/// Sweeps without a request after which a connection is idle.
const IDLE_SWEEPS: u32 = (IDLE_TIMEOUT.as_secs() / SWEEP_EVERY.as_secs()) as u32;

impl Endpoint {
    fn new(connector: Connector, http2: bool) -> Arc<Self> {
        let conns = if http2 {
            Conns::Http2 { shared: Mutex::default(), dialling: tokio::sync::Mutex::new(()), used: AtomicU32::new(0) }
        } else {
            Conns::Http1(Mutex::default())
        };
        let ep = Arc::new(Self { connector, conns, sweeps: AtomicU32::new(0) });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(sweep(Arc::downgrade(&ep)));
        }
        ep
    }

    /// Sends `req` (its URI absolute) and waits for the answer's head.
    /// A request a reused connection refused before sending any of it
    /// (the endpoint closed it meanwhile) goes once more on a new one.
    pub async fn request(&self, req: Request<Body>) -> Result<Response<UpstreamBody>, SendError> {
        self.send(req).await.map_err(|f| f.error)
    }

    /// As [`Endpoint::request`], with the request given back as it came
    /// when no connection could be had for it: the caller may send it to
    /// another endpoint without having kept a copy.
    pub async fn send(&self, mut req: Request<Body>) -> Result<Response<UpstreamBody>, Failed> {
        let now = self.sweeps.load(Ordering::Relaxed);
        match &self.conns {
            Conns::Http1(kept) => {
                let mut fresh = false;
                loop {
                    let (mut tx, dialled) = match ready(kept).filter(|_| !fresh) {
                        Some(tx) => (tx, None),
                        None => match self.dial_h1().await {
                            Ok(c) => c,
                            Err(error) => return Err(Failed { error, unsent: Some(Box::new(req)) }),
                        },
                    };
                    let absolute = origin_form(&mut req);
                    let sent = tx.try_send_request(req);
                    // Back at once: busy until the answer has been read.
                    keep(kept, Kept { tx, sweep: now });
                    match sent.await {
                        Ok(resp) => return Ok(connected_at(resp.map(UpstreamBody::Hyper), dialled)),
                        Err(e) => req = absolute.restore(retry_or_fail(e, fresh || dialled.is_some())?),
                    }
                    // A reused connection refused it unsent: once more, on a new one.
                    fresh = true;
                }
            }
            Conns::Http2 { shared, dialling, used } => {
                if used.load(Ordering::Relaxed) != now {
                    used.store(now, Ordering::Relaxed);
                }
                let (mut tx, dialled) = match self.ready_h2(shared, dialling).await {
                    Ok(c) => c,
                    Err(error) => return Err(Failed { error, unsent: Some(Box::new(req)) }),
                };
                // Its hop-by-hop headers, which HTTP/2 must not carry, were
                // removed where the request came in (`strip_hop_by_hop`).
                *req.version_mut() = Version::HTTP_2;
                let (head, body) = req.into_parts();
                let eos = hyper::body::Body::is_end_stream(&body);
                let (resp, stream) = tx.send_request(Request::from_parts(head, ()), eos)?;
                if !eos {
                    tokio::spawn(super::pump::pump(body, stream, h2::Reason::CANCEL));
                }
                let resp = resp.await?.map(|recv| UpstreamBody::H2 { recv, data_done: false });
                Ok(connected_at(resp, dialled))
            }
        }
    }

    /// A connection to the endpoint, ready for a request: a kept one, or
    /// one dialled now and kept. Err when the endpoint cannot be reached.
    pub async fn warm(&self) -> Result<(), SendError> {
        match &self.conns {
            Conns::Http1(kept) => {
                let tx = match ready(kept) {
                    Some(tx) => tx,
                    None => {
                        let (mut tx, _) = self.dial_h1().await?;
                        // Ready once its task has run: then the next
                        // request finds it ready, not busy.
                        tx.ready().await?;
                        tx
                    }
                };
                keep(kept, Kept { tx, sweep: self.sweeps.load(Ordering::Relaxed) });
            }
            Conns::Http2 { shared, dialling, .. } => {
                self.ready_h2(shared, dialling).await?;
            }
        }
        Ok(())
    }

    /// The shared HTTP/2 connection, ready for a stream: a connection
    /// closed meanwhile (its `ready()` fails before any request is given
    /// to it) is replaced once by a new one.
    async fn ready_h2(
        &self,
        shared: &Mutex<Option<(h2::client::SendRequest<Bytes>, Instant)>>,
        dialling: &tokio::sync::Mutex<()>,
    ) -> Result<(h2::client::SendRequest<Bytes>, Option<Instant>), SendError> {
        let (tx, dialled) = self.shared_h2(shared, dialling, false).await?;
        match tx.ready().await {
            Ok(tx) => return Ok((tx, dialled)),
            Err(e) if dialled.is_some() => return Err(e.into()),
            Err(e) => debug!(error = %e, "HTTP/2 connection to the endpoint closed; dialling again"),
        }
        let (tx, dialled) = self.shared_h2(shared, dialling, true).await?;
        Ok((tx.ready().await?, dialled))
    }

    /// The shared HTTP/2 connection, dialled when there is none (or it is
    /// closed, or `renew`), with when it was made if this call waited for it.
    async fn shared_h2(
        &self,
        shared: &Mutex<Option<(h2::client::SendRequest<Bytes>, Instant)>>,
        dialling: &tokio::sync::Mutex<()>,
        renew: bool,
    ) -> Result<(h2::client::SendRequest<Bytes>, Option<Instant>), SendError> {
        // A closed connection is not seen here: its `ready()` fails, and
        // the request goes again with `renew`.
        let current = || {
            let s = shared.lock().unwrap_or_else(|p| p.into_inner());
            s.as_ref().filter(|_| !renew).map(|(tx, at)| (tx.clone(), *at))
        };
        if let Some((tx, _)) = current() {
            return Ok((tx, None));
        }
        let _one = dialling.lock().await;
        if let Some((tx, at)) = current() {
            return Ok((tx, Some(at)));
        }
        let (io, at) = self.dial().await?;
        // Boxed for the reason `Connector::connect` is: HTTP/2's handshake
        // future is large (HTTP/1.1's is not).
        let (tx, conn) = Box::pin(h2_client().handshake::<_, Bytes>(io.into_inner())).await?;
        drive(conn, "HTTP/2");
        *shared.lock().unwrap_or_else(|p| p.into_inner()) = Some((tx.clone(), at));
        Ok((tx, Some(at)))
    }

    async fn dial_h1(&self) -> Result<(http1::SendRequest<Body>, Option<Instant>), SendError> {
        let (io, at) = self.dial().await?;
        let (tx, conn) = http1::handshake(io).await?;
        drive(conn, "HTTP/1.1");
        Ok((tx, Some(at)))
    }

    /// A new connection, and when it was made ([`Connector::connect`]
    /// boxes its own work).
    async fn dial(&self) -> Result<(Io, Instant), ConnectError> {
        let io = self.connector.connect().await?;
        Ok((io, Instant::now()))
    }

    /// One sweep: closes HTTP/1.1 connections idle for [`IDLE_TIMEOUT`]
    /// and the longest idle past [`MAX_IDLE_PER_ENDPOINT`]; the HTTP/2 one
    /// once no request went on it for [`IDLE_TIMEOUT`].
    fn sweep(&self) {
        let now = self.sweeps.fetch_add(1, Ordering::Relaxed) + 1;
        let idle_since = |last: u32| now.wrapping_sub(last) > IDLE_SWEEPS;
        match &self.conns {
            Conns::Http1(kept) => {
                let mut kept = kept.lock().unwrap_or_else(|p| p.into_inner());
                kept.retain(|k| !(k.tx.is_closed() || k.tx.is_ready() && idle_since(k.sweep)));
                let mut idle = kept.iter().filter(|k| k.tx.is_ready()).count();
                kept.retain(|k| {
                    let close = idle > MAX_IDLE_PER_ENDPOINT && k.tx.is_ready();
                    idle -= usize::from(close);
                    !close
                });
            }
            Conns::Http2 { shared, used, .. } => {
                if idle_since(used.load(Ordering::Relaxed)) {
                    // Its streams still open finish: the connection closes after.
                    shared.lock().unwrap_or_else(|p| p.into_inner()).take();
                }
            }
        }
    }

    #[cfg(test)]
    fn kept(&self) -> usize {
        match &self.conns {
            Conns::Http1(kept) => kept.lock().unwrap().len(),
            Conns::Http2 { shared, .. } => usize::from(shared.lock().unwrap().is_some()),
        }
    }
}

/// A kept HTTP/1.1 connection ready for a request: the oldest one; closed
/// ones are dropped, busy ones stay.
fn ready(kept: &Mutex<VecDeque<Kept>>) -> Option<http1::SendRequest<Body>> {
    let mut kept = kept.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..kept.len() {
        let k = kept.pop_front()?;
        if k.tx.is_closed() {
            continue;
        }
        if k.tx.is_ready() {
            return Some(k.tx);
        }
        kept.push_back(k);
    }
    None
}

fn keep(kept: &Mutex<VecDeque<Kept>>, k: Kept) {
    let mut kept = kept.lock().unwrap_or_else(|p| p.into_inner());
    if kept.len() < MAX_KEPT_PER_ENDPOINT {
        kept.push_back(k);
    }
}

/// Runs a connection's task until it ends.
fn drive<C, E>(conn: C, what: &'static str)
where
    C: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(error = %e, "{what} connection to the endpoint ended");
        }
    });
}

/// Sweeps an endpoint's idle connections (see [`Endpoint::sweep`]) until
/// the endpoint is dropped.
async fn sweep(ep: Weak<Endpoint>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(ep) = ep.upgrade() else { return };
        ep.sweep();
    }
}

/// The request back, to go on a new connection, when this one refused it
/// before sending any of it and was a reused one; else the error.
fn retry_or_fail(mut e: TrySendError<Request<Body>>, fresh: bool) -> Result<Request<Body>, SendError> {
    match e.take_message() {
        Some(req) if !fresh => Ok(req),
        _ => Err(SendError::Http(e.into_error())),
    }
}

/// The settings of an HTTP/2 connection to an endpoint: hyper's client
/// defaults (2 MiB stream and 5 MiB connection windows, at most 100
/// streams before the endpoint's settings arrive, 16 KiB of response
/// headers, no server push).
fn h2_client() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(2 << 20)
        .initial_connection_window_size(5 << 20)
        .initial_max_send_streams(100)
        .max_header_list_size(16 << 10)
        .max_send_buffer_size(1 << 20)
        .enable_push(false);
    b
}

/// Sends a request body into its h2 stream as the stream's window allows;
/// a body that fails resets the stream (the endpoint never sees a cut body
/// as whole).
fn connected_at<B>(mut resp: Response<B>, dialled: Option<Instant>) -> Response<B> {
    if let Some(at) = dialled {
        resp.extensions_mut().insert(ConnectedAt(at));
    }
    resp
}

/// An HTTP/1.1 request line names the path; `Host` names the authority
/// (added from the URI when the client sent none). What it replaced is
/// returned, to make the request as it came again.
fn origin_form(req: &mut Request<Body>) -> Absolute {
    let version = std::mem::replace(req.version_mut(), Version::HTTP_11);
    let mut host_added = false;
    if !req.headers().contains_key(HOST) {
        if let Some(v) = req.uri().authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
            req.headers_mut().insert(HOST, v);
            host_added = true;
        }
    }
    let path = match req.uri().path_and_query() {
        Some(p) if p.as_str() != "/" => {
            let mut parts = hyper::http::uri::Parts::default();
            parts.path_and_query = Some(p.clone());
            Uri::from_parts(parts).unwrap_or_default()
        }
        _ => Uri::default(),
    };
    let uri = std::mem::replace(req.uri_mut(), path);
    Absolute { uri, version, host_added }
}

/// What [`origin_form`] changed in a request.
struct Absolute {
    uri: Uri,
    version: Version,
    host_added: bool,
}

impl Absolute {
    fn restore(self, mut req: Request<Body>) -> Request<Body> {
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        if self.host_added {
            req.headers_mut().remove(HOST);
        }
        req
    }
}

/// Endpoints by (how to dial, HTTP/2 or not); kept across state writes so
/// their connections survive an `apply`.
#[derive(Default)]
pub struct Upstreams {
    endpoints: Mutex<HashMap<(Dial, bool), Arc<Endpoint>>>,
}

impl Upstreams {
    /// The endpoint `dial` reaches, speaking HTTP/2 with prior knowledge
    /// when `http2`. The lock is held for a lookup, never across an await.
    pub fn endpoint(
        &self,
        dial: Dial,
        http2: bool,
        pool: Option<&Arc<Pool>>,
        connect_timeout: Duration,
    ) -> Arc<Endpoint> {
        let mut m = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        m.entry((dial.clone(), http2))
            .or_insert_with(|| {
                let protocol = if http2 { StreamProtocol::Http2 } else { StreamProtocol::Http1 };
                Endpoint::new(Connector::new(dial, pool.cloned(), connect_timeout, Some(protocol)), http2)
            })
            .clone()
    }

    /// Forgets the endpoints no longer in use (their connections close
    /// once the requests on them are done).
    pub fn retain(&self, keep: impl Fn(SocketAddr) -> bool) {
        self.endpoints.lock().unwrap_or_else(|p| p.into_inner()).retain(|(d, _), _| keep(d.target()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::TokioExecutor;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;

    /// A backend on loopback answering each request with its request line
    /// and `Host`; counts the connections it accepted. `once`: it closes
    /// each connection after one answer.
    async fn backend(http2: bool, once: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        listen(move |s| async move {
            let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let host = req.headers().get(HOST).map(|h| h.to_str().unwrap().to_owned()).unwrap_or_default();
                let line = format!("{} {} {:?} {host}", req.method(), req.uri(), req.version());
                Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(Bytes::from(line))))
            });
            let io = TokioIo::new(s);
            if http2 {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(io, svc).await;
            } else {
                let _ = hyper::server::conn::http1::Builder::new().keep_alive(!once).serve_connection(io, svc).await;
            }
        })
        .await
    }

    /// A listener on loopback that serves each connection with `serve` in
    /// a task of its own; counts the connections it accepted.
    async fn listen<F, Fut>(serve: F) -> (SocketAddr, Arc<AtomicUsize>)
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let n = accepted.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                n.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(s));
            }
        });
        (addr, accepted)
    }

    fn endpoint(addr: SocketAddr, http2: bool) -> Arc<Endpoint> {
        Upstreams::default().endpoint(Dial::Direct(addr), http2, None, Duration::from_secs(1))
    }

    fn get(uri: &str) -> Request<Body> {
        let body = Empty::<Bytes>::new().map_err(|never| match never {}).boxed_unsync();
        let mut req = Request::get(uri).body(body).unwrap();
        if uri.contains("svc") {
            req.headers_mut().insert(HOST, HeaderValue::from_static("svc.example:8080"));
        }
        req
    }

    async fn text(resp: Response<UpstreamBody>) -> String {
        String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    /// What the pool gives back of a request it could not send is the
    /// request as it came, though it was made origin-form for HTTP/1.1.
    #[test]
    fn a_request_made_origin_form_is_given_back_as_it_came() {
        for uri in ["http://web.default:80/x?y=1", "http://svc.example:8080/", "http://web/"] {
            let mut req = get(uri);
            *req.version_mut() = Version::HTTP_2;
            let before = (req.uri().clone(), req.version(), req.headers().clone());
            let absolute = origin_form(&mut req);
            assert_eq!(req.version(), Version::HTTP_11);
            assert!(req.uri().authority().is_none() && req.headers().contains_key(HOST), "{uri}: {req:?}");
            let req = absolute.restore(req);
            assert_eq!((req.uri().clone(), req.version(), req.headers().clone()), before, "{uri}");
        }
    }

    /// A request to an endpoint no connection can be had to is given
    /// back whole, in either protocol.
    #[tokio::test]
    async fn a_request_no_connection_took_is_given_back() {
        for http2 in [false, true] {
            // Nothing listens there: refused.
            let ep = endpoint("127.0.0.1:1".parse().unwrap(), http2);
            let Err(f) = ep.send(get("http://svc.example:8080/a?b=1")).await else { panic!("sent") };
            assert!(matches!(f.error, SendError::Connect(_)), "{}", f.error);
            let back = f.unsent.expect("given back");
            assert_eq!(back.uri(), "http://svc.example:8080/a?b=1");
            assert_eq!(back.headers().get(HOST).unwrap(), "svc.example:8080");
        }
    }

    #[tokio::test]
    async fn http1_requests_one_after_another_reuse_one_connection_in_origin_form() {
        let (addr, accepted) = backend(false, false).await;
        let ep = endpoint(addr, false);
        let first = ep.request(get("http://svc.example:8080/a/b?c=1")).await.unwrap();
        assert!(first.extensions().get::<ConnectedAt>().is_some(), "the first waited for its connection");
        assert_eq!(text(first).await, "GET /a/b?c=1 HTTP/1.1 svc.example:8080");
        for _ in 0..9 {
            let resp = ep.request(get("http://other.example/")).await.unwrap();
            assert!(resp.extensions().get::<ConnectedAt>().is_none(), "a kept connection: no connect to wait for");
            assert_eq!(text(resp).await, "GET / HTTP/1.1 other.example", "Host from the URI when the client sent none");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(ep.kept(), 1);
    }

    #[tokio::test]
    async fn http1_concurrent_requests_each_take_a_ready_connection_and_idle_ones_are_swept() {
        let (addr, accepted) = backend(false, false).await;
        let ep = endpoint(addr, false);
        for _ in 0..3 {
            let all = (0..8).map(|_| {
                let ep = ep.clone();
                tokio::spawn(async move { text(ep.request(get("http://svc/x")).await.unwrap()).await })
            });
            for t in all {
                assert!(t.await.unwrap().starts_with("GET /x HTTP/1.1"));
            }
        }
        let n = accepted.load(Ordering::SeqCst);
        assert!((1..=8).contains(&n), "at most one connection per request in flight, reused across rounds: {n}");
        for _ in 0..IDLE_SWEEPS {
            assert_eq!(ep.kept(), n, "not idle long enough");
            ep.sweep();
        }
        ep.sweep();
        assert_eq!(ep.kept(), 0, "idle past the timeout: closed");
    }

    #[tokio::test]
    async fn http1_a_backend_that_closes_every_connection_still_answers_every_request() {
        let (addr, accepted) = backend(false, true).await;
        let ep = endpoint(addr, false);
        for i in 0..10 {
            let resp = ep.request(get(&format!("http://svc/{i}"))).await.unwrap();
            assert_eq!(text(resp).await, format!("GET /{i} HTTP/1.1 svc.example:8080"));
            tokio::task::yield_now().await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 10);
    }

    /// A kept connection the endpoint closed before the proxy noticed
    /// (its task has not run since): hyper writes the request before it
    /// reads the close, so the request may have reached the endpoint and
    /// fails as sent (never as a connect failure, which would send it to
    /// another endpoint as if unsent); the next request dials anew. The
    /// backend is a thread, so blocking this test's only runtime thread
    /// keeps the connection's task from seeing the close first.
    #[tokio::test]
    async fn http1_a_request_on_a_kept_connection_the_endpoint_closed_fails_as_sent_and_the_next_dials_anew() {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (close, closed) = std::sync::mpsc::channel::<()>();
        let backend = std::thread::spawn(move || {
            let answer = |s: &mut std::net::TcpStream| {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).unwrap();
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").unwrap();
            };
            let (mut first, _) = l.accept().unwrap();
            answer(&mut first);
            closed.recv().unwrap();
            drop(first);
            let (mut second, _) = l.accept().unwrap();
            answer(&mut second);
        });
        let ep = endpoint(addr, false);
        assert_eq!(text(ep.request(get("http://svc/1")).await.unwrap()).await, "ok");
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let Conns::Http1(kept) = &ep.conns else { unreachable!() };
        assert!(kept.lock().unwrap().front().is_some_and(|k| k.tx.is_ready()), "kept and ready");
        close.send(()).unwrap();
        // Blocking on purpose: the connection's task must not run.
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(Duration::from_millis(100));
        assert!(kept.lock().unwrap().front().is_some_and(|k| k.tx.is_ready()), "the close is not seen yet");
        let e = ep.request(get("http://svc/2")).await.unwrap_err();
        assert!(matches!(e, SendError::Http(_)), "{e}");
        let resp = ep.request(get("http://svc/3")).await.unwrap();
        assert!(resp.extensions().get::<ConnectedAt>().is_some(), "answered over a new connection");
        assert_eq!(text(resp).await, "ok");
        backend.join().unwrap();
    }

    #[tokio::test]
    async fn http2_requests_share_one_connection() {
        let (addr, accepted) = backend(true, false).await;
        let ep = endpoint(addr, true);
        let all: Vec<_> = (0..20)
            .map(|i| {
                let ep = ep.clone();
                tokio::spawn(async move { text(ep.request(get(&format!("http://svc/{i}"))).await.unwrap()).await })
            })
            .collect();
        for (i, t) in all.into_iter().enumerate() {
            assert_eq!(t.await.unwrap(), format!("GET http://svc/{i} HTTP/2.0 svc.example:8080"));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "the requests that came while it was dialled waited for it");
        // The first sweep sees the requests; each next one, none.
        for _ in 0..=(IDLE_TIMEOUT.as_secs() / SWEEP_EVERY.as_secs()) {
            assert_eq!(ep.kept(), 1, "kept while not idle for the timeout");
            ep.sweep();
        }
        assert_eq!(ep.kept(), 0, "no request for the idle timeout: closed");
        let resp = ep.request(get("http://svc/again")).await.unwrap();
        assert!(resp.extensions().get::<ConnectedAt>().is_some(), "a new connection for the next request");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// An HTTP/2 backend on the `h2` crate: to each request it answers
    /// with the request body's bytes, then `x-trailer: done` trailers; or,
    /// for path `/reset`, with a part of a body and then a reset stream.
    /// Each connection is closed after `answers` requests (None: never).
    async fn h2_backend(answers: Option<usize>) -> (SocketAddr, Arc<AtomicUsize>) {
        listen(move |s| async move {
            let mut conn = h2::server::handshake(s).await.unwrap();
            let mut served = 0;
            // The connection is polled here; each stream is served in a
            // task of its own.
            while let Some(Ok((req, respond))) = conn.accept().await {
                tokio::spawn(answer(req, respond));
                served += 1;
                if answers.is_some_and(|a| served >= a) {
                    conn.graceful_shutdown();
                }
            }
        })
        .await
    }

    async fn answer(req: Request<h2::RecvStream>, mut respond: h2::server::SendResponse<Bytes>) {
        let (head, mut body) = req.into_parts();
        let mut got = Vec::new();
        while let Some(Ok(d)) = body.data().await {
            let _ = body.flow_control().release_capacity(d.len());
            got.extend_from_slice(&d);
        }
        let mut send = respond.send_response(Response::new(()), false).unwrap();
        if head.uri.path() == "/reset" {
            send.send_data(Bytes::from_static(b"part"), false).unwrap();
            // The part goes out before the reset.
            tokio::time::sleep(Duration::from_millis(20)).await;
            send.send_reset(h2::Reason::INTERNAL_ERROR);
            return;
        }
        send.reserve_capacity(got.len());
        send.send_data(Bytes::from(got), false).unwrap();
        let mut t = hyper::HeaderMap::new();
        t.insert("x-trailer", HeaderValue::from_static("done"));
        send.send_trailers(t).unwrap();
    }

    #[tokio::test]
    async fn http2_request_bodies_go_whole_and_answers_come_with_their_trailers() {
        let (addr, _) = h2_backend(None).await;
        let ep = endpoint(addr, true);
        let big = Bytes::from(vec![7u8; 300 << 10]);
        let body = http_body_util::Full::new(big.clone()).map_err(|never| match never {}).boxed_unsync();
        let req = Request::post("http://svc/echo").body(body).unwrap();
        let resp = ep.request(req).await.unwrap();
        let all = resp.into_body().collect().await.unwrap();
        assert_eq!(all.trailers().and_then(|t| t.get("x-trailer")).unwrap(), "done");
        assert_eq!(all.to_bytes(), big, "the body, past the stream's first window, whole");
    }

    #[tokio::test]
    async fn http2_an_answer_the_endpoint_resets_midway_fails_and_never_looks_whole() {
        let (addr, _) = h2_backend(None).await;
        let ep = endpoint(addr, true);
        let resp = ep.request(get("http://svc/reset")).await.unwrap();
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"part");
        let e = body.frame().await.unwrap().unwrap_err();
        assert!(matches!(e, BodyError::H2(ref h) if h.reason() == Some(h2::Reason::INTERNAL_ERROR)), "{e}");
    }

    #[tokio::test]
    async fn http2_a_connection_the_endpoint_closed_is_dialled_again() {
        let (addr, accepted) = h2_backend(Some(1)).await;
        let ep = endpoint(addr, true);
        for i in 0..3 {
            let resp = ep.request(get(&format!("http://svc/{i}"))).await.unwrap();
            assert!(resp.extensions().get::<ConnectedAt>().is_some(), "request {i} on a new connection");
            resp.into_body().collect().await.unwrap();
            // The endpoint's GOAWAY and close reach the connection's task.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn an_endpoint_that_refuses_is_a_connect_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        for http2 in [false, true] {
            let e = endpoint(addr, http2).request(get("http://svc/")).await.unwrap_err();
            assert!(matches!(e, SendError::Connect(ConnectError::Io { .. })), "{e}");
            let e = endpoint(addr, http2).warm().await.unwrap_err();
            assert!(matches!(e, SendError::Connect(ConnectError::Io { .. })), "warming it too: {e}");
        }
    }

    #[tokio::test]
    async fn a_warmed_endpoint_answers_its_next_requests_on_the_connection_it_dialled() {
        for http2 in [false, true] {
            let (addr, accepted) = backend(http2, false).await;
            let ep = endpoint(addr, http2);
            ep.warm().await.unwrap();
            ep.warm().await.unwrap();
            assert_eq!(ep.kept(), 1, "one connection, kept: http2 {http2}");
            for i in 0..3 {
                let resp = ep.request(get(&format!("http://svc/{i}"))).await.unwrap();
                assert!(resp.extensions().get::<ConnectedAt>().is_none(), "no connect to wait for: http2 {http2}");
                text(resp).await;
            }
            assert_eq!(accepted.load(Ordering::SeqCst), 1, "the one warmed: http2 {http2}");
        }
    }
}
