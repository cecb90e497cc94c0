//! The request-aware path: the proxy terminates the client's HTTP/1.1 or
//! HTTP/2 connection and routes every request on its own (P2C by weight
//! over peak-EWMA of response-header latency and requests in flight,
//! priority failover, breaker), over pooled upstream connections
//! ([`upstream`]). A connect failure is retried on another endpoint before
//! the request fails; a request no endpoint could take gets 503 (gRPC:
//! `UNAVAILABLE`), never a reset. Each finished request is counted by
//! status class (gRPC: its status) and logged once.

pub mod detect;
pub mod inbound;
mod observe;
mod unread;
mod upgrade;
pub mod upstream;

use std::convert::Infallible;
use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, warn};

use self::observe::{Finished, Observed};
use self::upstream::{Body, ConnectedAt, Connector, Dial, Upstreams};
use super::error::ConnectError;
use super::tries::Tries;
use super::{Route, RouteEndpoint, Workload};
use crate::drain::Drain;
use crate::model::AppProtocol;
use crate::telemetry::ProxyCounters;
use crate::tunnel::client::Pool;
use hyper_util::client::legacy::Client;
use std::sync::OnceLock;

/// What every request of one client connection shares.
pub struct Conn {
    pub route: Arc<Route>,
    pub source: Option<Arc<Workload>>,
    pub client: SocketAddrV4,
    pub upstreams: Arc<Upstreams>,
    pub tunnel: Option<Arc<Pool>>,
    /// gRPC: failures answer with a gRPC status, not an HTTP one.
    pub grpc: bool,
    /// HTTP/2 with prior knowledge (else HTTP/1.1), to the client and so
    /// to the endpoints.
    pub http2: bool,
    pub counters: Arc<ProxyCounters>,
    /// The pooling client of each endpoint of `route`, found once per
    /// client connection, not per request.
    clients: Vec<OnceLock<Client<Connector, Body>>>,
}

impl Conn {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        route: Arc<Route>,
        source: Option<Arc<Workload>>,
        client: SocketAddrV4,
        upstreams: Arc<Upstreams>,
        tunnel: Option<Arc<Pool>>,
        proto: AppProtocol,
        counters: Arc<ProxyCounters>,
    ) -> Self {
        let clients = route.endpoints.iter().map(|_| OnceLock::new()).collect();
        let (grpc, http2) = (proto == AppProtocol::Grpc, proto != AppProtocol::Http);
        Self { route, source, client, upstreams, tunnel, grpc, http2, counters, clients }
    }

    /// The pooling client for endpoint `i` (`ep`) of the route.
    fn client(&self, i: usize, ep: &RouteEndpoint) -> Result<Client<Connector, Body>, ConnectError> {
        if let Some(c) = self.clients[i].get() {
            return Ok(c.clone());
        }
        let c = self.upstreams.client(dial(ep, self)?, self.http2, self.tunnel.as_ref(), self.route.connect_timeout);
        Ok(self.clients[i].get_or_init(|| c).clone())
    }
}

/// Serves one client connection speaking HTTP/1.1 (`http2` false) or
/// HTTP/2 with prior knowledge, until the client closes it or the drain
/// ends it gracefully.
pub async fn serve(stream: TcpStream, conn: Arc<Conn>, drain: Drain) {
    let http2 = conn.http2;
    let io = TokioIo::new(stream);
    let svc = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(handle(req, &conn).await) }
    });
    let result = if http2 {
        let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new()).max_concurrent_streams(1024);
        drain.serve(b.serve_connection(io, svc), |c| c.graceful_shutdown()).await
    } else {
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(TokioTimer::new()).keep_alive(true).header_read_timeout(Duration::from_secs(30));
        drain.serve(b.serve_connection(io, svc).with_upgrades(), |c| c.graceful_shutdown()).await
    };
    if let Err(e) = result {
        debug!(error = %e, "HTTP client connection ended");
    }
}

/// Hop-by-hop headers (RFC 9110 7.6.1): they describe one connection and
/// are not forwarded; nor is any header the `Connection` header names.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

pub(super) fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in HOP_BY_HOP.iter().chain(&named) {
        h.remove(n);
    }
    // `te` may only say `trailers` (which gRPC needs) past this hop.
    if h.get(header::TE).is_some_and(|v| v.as_bytes() != b"trailers") {
        h.remove(header::TE);
    }
}

/// The request's URI in absolute form, which the pooling client needs:
/// HTTP/1 requests carry the authority in `Host`.
fn absolute(req: &Request<Incoming>) -> Option<Uri> {
    if req.uri().authority().is_some() {
        return Some(req.uri().clone());
    }
    let host = req.headers().get(header::HOST)?.to_str().ok()?;
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    format!("http://{host}{path}").parse().ok()
}

fn empty() -> Body {
    Empty::<Bytes>::new().map_err(|never| match never {}).boxed_unsync()
}

/// The answer when no endpoint takes the request: 503, or for gRPC a
/// trailers-only `UNAVAILABLE` (code 14).
pub(super) fn unavailable(grpc: bool, why: &str) -> Response<Body> {
    let mut r = if grpc {
        let mut r = Response::new(empty());
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        r.headers_mut().insert("grpc-status", HeaderValue::from_static("14"));
        if let Ok(v) = HeaderValue::from_str(why) {
            r.headers_mut().insert("grpc-message", v);
        }
        r
    } else {
        let body = Full::new(Bytes::from(format!("no endpoint could take the request: {why}\n")));
        let mut r = Response::new(body.map_err(|never| match never {}).boxed_unsync());
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        r
    };
    r.headers_mut().insert("mesh-error", HeaderValue::from_static("unavailable"));
    r
}

fn bad_request(why: &'static str) -> Response<Body> {
    let body = Full::new(Bytes::from_static(why.as_bytes())).map_err(|never| match never {}).boxed_unsync();
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::BAD_REQUEST;
    r
}

/// How to reach `ep` for a request of `conn`'s client (see
/// [`crate::proxy::dial`]), as the key of its pool.
fn dial(ep: &RouteEndpoint, conn: &Conn) -> Result<Dial, ConnectError> {
    let addr = ep.state.addr;
    match crate::proxy::dial::via(ep, &conn.route) {
        Some(via) => {
            let source = conn.source.as_ref().ok_or_else(|| ConnectError::NoIdentity { addr, node: via.0.clone() })?;
            Ok(Dial::Tunnel {
                target: addr,
                via: via.clone(),
                source: source.identity.clone(),
                service: conn.route.service.clone(),
            })
        }
        None => Ok(Dial::Direct(addr)),
    }
}

/// The connect error under a pooling client's error, if that is what it is.
fn connect_error(e: &hyper_util::client::legacy::Error) -> Option<&ConnectError> {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(c) = s.downcast_ref::<ConnectError>() {
            return Some(c);
        }
        source = s.source();
    }
    None
}

/// An upgrade or `CONNECT`: one endpoint, a connection of its own, then
/// bytes both ways (see [`upgrade`]). Not retried: the client's side is
/// handed over with the request.
async fn upgraded(req: Request<Incoming>, conn: &Conn, started: Instant) -> Response<Body> {
    let route = &conn.route;
    let finished = Finished::new(conn, req.method(), &absolute(&req).unwrap_or_else(|| req.uri().clone()));
    let Some(i) = route.pick_index(&[], Instant::now()) else {
        return finished.failed("no_endpoint", started, unavailable(false, "no_endpoint"));
    };
    let ep = &route.endpoints[i];
    let dial = match dial(ep, conn) {
        Ok(d) => d,
        Err(e) => {
            super::tries::blame(ep, &e);
            return finished.failed(e.reason(), started, unavailable(false, e.reason()));
        }
    };
    let connector = upstream::Connector::new(dial.clone(), conn.tunnel.clone(), route.connect_timeout, None);
    match upgrade::forward(req, dial, connector).await {
        Ok(resp) => {
            ep.state.connected(started.elapsed(), Instant::now());
            let (head, body) = resp.into_parts();
            let observed = Observed::new(body, finished.at(i, &head, started));
            Response::from_parts(head, observed.boxed_unsync())
        }
        Err(e) => {
            let reason = match &e {
                upgrade::UpgradeError::Connect(c) => {
                    super::tries::blame(ep, c);
                    c.reason()
                }
                upgrade::UpgradeError::Http(_) => "upstream",
            };
            warn!(service = %route.name, endpoint = %ep.state.addr, error = %e, "upgrade could not reach the endpoint");
            finished.failed(reason, started, unavailable(false, reason))
        }
    }
}

/// Routes one request: picks an endpoint, sends it over that endpoint's
/// pool, and tries another endpoint as [`Tries`] allows when connecting
/// fails: such a request was never written, so its body (if any, see
/// [`unread`]) is still there to send.
async fn handle(req: Request<Incoming>, conn: &Conn) -> Response<Body> {
    let started = Instant::now();
    let route = &conn.route;
    if req.version() != Version::HTTP_2 && upgrade::wanted(&req) {
        return upgraded(req, conn, started).await;
    }
    let Some(uri) = absolute(&req) else {
        return bad_request("the request names no host\n");
    };
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.uri = uri;
    let body = (!hyper::body::Body::is_end_stream(&body)).then(|| unread::Unread::new(body.boxed_unsync()));
    let finished = Finished::new(conn, &parts.method, &parts.uri);
    let mut tries = Tries::new(route);
    let mut reason = "no_endpoint";
    while let Some((i, ep)) = tries.pick() {
        let client = match conn.client(i, ep) {
            Ok(c) => c,
            Err(e) => {
                super::tries::blame(ep, &e);
                warn!(service = %route.name, error = %e, "request refused; not retried");
                return finished.failed(e.reason(), started, unavailable(conn.grpc, e.reason()));
            }
        };
        let b = body.as_ref().map_or_else(empty, unread::Unread::body);
        let in_flight = ep.state.start();
        let t0 = Instant::now();
        match client.request(Request::from_parts(parts.clone(), b)).await {
            Ok(resp) => {
                // From the send, or from the connect if this request waited for one.
                let since = resp.extensions().get::<ConnectedAt>().map_or(t0, |c| c.0.max(t0));
                let latency = since.elapsed();
                drop(in_flight);
                ep.state.connected(latency, Instant::now());
                route.series.response_latency.observe(latency.as_secs_f64());
                ep.series.latency.observe(latency);
                let (mut head, body) = resp.into_parts();
                strip_hop_by_hop(&mut head.headers);
                let observed = Observed::new(body, finished.at(i, &head, started));
                return Response::from_parts(head, observed.boxed_unsync());
            }
            Err(e) => {
                drop(in_flight);
                let Some(c) = connect_error(&e) else {
                    // The endpoint took the request and then failed it.
                    warn!(service = %route.name, endpoint = %ep.state.addr, error = %e, "upstream request failed");
                    let mut r = unavailable(conn.grpc, "upstream");
                    if !conn.grpc {
                        *r.status_mut() = StatusCode::BAD_GATEWAY;
                    }
                    return finished.failed("upstream", started, r);
                };
                reason = c.reason();
                if body.as_ref().is_some_and(|b| !b.still_unread()) {
                    // Part of the body went with this try: it cannot go again.
                    super::tries::blame(ep, c);
                    break;
                }
                if !tries.failed(ep, c, &conn.counters).await {
                    break;
                }
            }
        }
    }
    warn!(service = %route.name, reason, "no endpoint could take the request");
    finished.failed(reason, started, unavailable(conn.grpc, reason))
}
