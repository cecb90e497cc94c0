//! The request-aware path: the proxy terminates the client's HTTP/1.1 or
//! HTTP/2 connection and routes every request on its own (P2C by weight
//! over peak-EWMA of response-header latency and requests in flight,
//! priority failover, breaker), over pooled upstream connections
//! ([`upstream`]). A connect failure is retried on another endpoint before
//! the request fails; a request no endpoint could take gets 503 (gRPC:
//! `UNAVAILABLE`), never a reset. Each finished request is counted by
//! status class (gRPC: its status) and logged once.

mod advertise;
mod backend;
mod conn;
pub mod detect;
mod frontend;
pub mod inbound;
mod mirror;
mod observe;
pub mod policy;
mod pump;
mod replay;
pub mod retry;
pub mod router;
mod server;
pub mod trace;
mod upgrade;
pub mod upstream;

pub use conn::{Accepted, Conn};

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, warn};

use self::frontend::{Decided, Target};
use self::observe::{Finished, Observed};
use self::upstream::{Body, UpstreamBody};
use super::{ProxyCounters, Route, RouteEndpoint};
use crate::balance::endpoint::Answered;
use crate::drain::{Drain, Ended};
use crate::env::Env;
use crate::model::http::{RetryPolicy, Rules};
use crate::relay::Watched;

/// Serves one client connection speaking HTTP/1.1 (`http2` false) or
/// HTTP/2 with prior knowledge, until the client closes it or the drain
/// ends it gracefully: HTTP/1.1 on hyper's server, waiting at most 30 s
/// for the next request's headers; HTTP/2 on the `h2` crate ([`server`]),
/// a connection that moves no byte either way for the idle timeout
/// (`--idle-timeout`, as relays) given a GOAWAY and closed.
///
/// Boxed: a connection's state is some kilobytes, and the task that
/// accepts a connection relays it when it turns out not to be HTTP; so
/// unboxed, it would size every relayed connection's task too.
pub fn serve(stream: TcpStream, conn: Arc<Conn>, drain: Drain) -> BoxFuture<'static, ()> {
    Box::pin(serve_conn(stream, conn, drain))
}

async fn serve_conn(stream: TcpStream, conn: Arc<Conn>, drain: Drain) {
    if conn.http2 {
        return serve_h2(stream, &conn, &drain).await;
    }
    let (client, max_headers) = (conn.client, conn.max_headers);
    let counters = conn.counters.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let conn = conn.clone();
        // Boxed: the request's future is some kilobytes, and hyper moves
        // it several times; a pointer moves for free.
        Box::pin(async move { Ok::<_, Infallible>(handle(req.map(UpstreamBody::Hyper), &conn).await) })
    });
    let mut b = hyper::server::conn::http1::Builder::new();
    // A header block past the read buffer is answered 431.
    b.timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(Duration::from_secs(30))
        .max_buf_size(max_headers.max(8192));
    let served = drain.serve(b.serve_connection(TokioIo::new(stream), svc).with_upgrades(), |c| c.graceful_shutdown());
    match served.await {
        Err(e) if e.is_parse_too_large() => {
            counters.headers_too_large.inc();
            log_too_large(&counters, client, max_headers);
        }
        Err(e) => debug!(error = %e, "HTTP client connection ended"),
        Ok(()) => {}
    }
}

/// An HTTP/2 client connection (see [`server`]): its handshake and then
/// its streams, under the drain and the idle timeout.
async fn serve_h2(stream: TcpStream, conn: &Conn, drain: &Drain) {
    let (io, activity) = Watched::new(stream);
    // h2 decodes header blocks up to 4x the limit and `handle` answers 431
    // past the limit itself, counted and logged; the client is told the
    // limit ([`advertise`]). Far past it, h2's own guards against
    // CONTINUATION floods close the connection.
    let decoded = u32::try_from(conn.max_headers.saturating_mul(4)).unwrap_or(u32::MAX);
    let io = advertise::Advertise::new(io, u32::try_from(conn.max_headers).unwrap_or(u32::MAX));
    let handshake = server::builder(decoded).handshake::<_, Bytes>(io);
    let connection = tokio::select! {
        c = handshake => c,
        _ = drain.stopped() => return,
        _ = activity.idle(conn.idle) => {
            conn.counters.idle_closed.inc();
            return debug!(idle = ?conn.idle, "HTTP/2 client sent no preface within the idle timeout (--idle-timeout); closed");
        }
    };
    let served = match connection {
        Ok(c) => server::Served::new(c, conn),
        Err(e) => return debug!(error = %e, "HTTP/2 client connection ended before its preface"),
    };
    let result = match drain.serve_until_idle(served, server::Served::graceful_shutdown, activity.idle(conn.idle)).await
    {
        Ended::Done(r) => r,
        Ended::Idle(r) => {
            conn.counters.idle_closed.inc();
            debug!(idle = ?conn.idle, "HTTP/2 client connection moved nothing for the idle timeout (--idle-timeout); closed");
            r.unwrap_or(Ok(()))
        }
    };
    if let Err(e) = result {
        debug!(error = %e, "HTTP/2 client connection ended");
    }
}

/// A header block's size as HTTP/2 counts it (RFC 9113 6.5.2): each
/// header's name and value, and 32 more.
fn header_list_size(h: &HeaderMap) -> usize {
    h.iter().map(|(n, v)| n.as_str().len() + v.len() + 32).sum()
}

fn too_large(conn: &Conn) {
    conn.counters.headers_too_large.inc();
    log_too_large(&conn.counters, conn.client, conn.max_headers);
}

/// Logs a 431 the first time a client gets one.
fn log_too_large(counters: &ProxyCounters, client: std::net::SocketAddr, limit: usize) {
    if counters.headers_too_large_logged.first(client.ip()) {
        warn!(%client, limit, "request headers over the limit (--max-request-headers): 431 (logged once per client)");
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
    // Most messages carry none: one pass over the names a message has
    // costs less than a lookup of each hop-by-hop name.
    if !h.keys().any(|k| k == header::TE || HOP_BY_HOP.contains(k)) {
        return;
    }
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

/// The request's URI in absolute form, which routing and an HTTP/2
/// upstream need: HTTP/1 requests carry the authority in `Host` (the pool
/// sends HTTP/1.1 requests in origin form again).
fn absolute<B>(req: &Request<B>) -> Option<Uri> {
    if req.uri().authority().is_some() {
        return Some(req.uri().clone());
    }
    let host = req.headers().get(header::HOST)?;
    let mut parts = req.uri().clone().into_parts();
    parts.scheme = Some(hyper::http::uri::Scheme::HTTP);
    parts.authority = Some(host.as_bytes().try_into().ok()?);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(hyper::http::uri::PathAndQuery::from_static("/"));
    }
    Uri::from_parts(parts).ok()
}

fn empty() -> Body {
    Empty::<Bytes>::new().map_err(|never| match never {}).boxed_unsync()
}

/// An answer the proxy makes itself: `status`, or for gRPC a
/// trailers-only status `grpc_code` with `why` as its message; its
/// `mesh-error` header says what happened (`error`).
pub(super) fn answer(grpc: bool, status: StatusCode, grpc_code: u32, error: &'static str, why: &str) -> Response<Body> {
    let mut r = if grpc {
        let mut r = Response::new(empty());
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        r.headers_mut().insert("grpc-status", HeaderValue::from(grpc_code));
        if let Ok(v) = HeaderValue::from_str(why) {
            r.headers_mut().insert("grpc-message", v);
        }
        r
    } else {
        let body = Full::new(Bytes::from(format!("{why}\n")));
        let mut r = Response::new(body.map_err(|never| match never {}).boxed_unsync());
        *r.status_mut() = status;
        r
    };
    r.headers_mut().insert("mesh-error", HeaderValue::from_static(error));
    r
}

/// The answer to a request an authorization policy denied: 403 `RBAC:
/// access denied`, or for gRPC `PERMISSION_DENIED` (code 7).
pub(super) fn forbidden(grpc: bool) -> Response<Body> {
    answer(grpc, StatusCode::FORBIDDEN, 7, "denied", "RBAC: access denied")
}

/// Removes what only the mesh may say from a client's request: its own
/// `mesh-*` headers (a client could claim another's address with
/// `mesh-source`) and `x-forwarded-client-cert` (another's identity).
pub(super) fn strip_mesh_headers(h: &mut HeaderMap) {
    if !h.keys().any(|k| k.as_str().starts_with("mesh-") || k == crate::proxy::authz::XFCC) {
        return;
    }
    let ours: Vec<HeaderName> = h.keys().filter(|k| k.as_str().starts_with("mesh-")).cloned().collect();
    for k in ours {
        h.remove(k);
    }
    h.remove(crate::proxy::authz::XFCC);
}

/// The answer when no endpoint takes the request: 503, or for gRPC
/// `UNAVAILABLE` (code 14).
pub(super) fn unavailable(grpc: bool, why: &str) -> Response<Body> {
    answer(
        grpc,
        StatusCode::SERVICE_UNAVAILABLE,
        14,
        "unavailable",
        &format!("no endpoint could take the request: {why}"),
    )
}

/// The answer when the service the client dialled left the state while
/// its connection stayed open: 503, or for gRPC `UNAVAILABLE`.
fn gone(grpc: bool) -> Response<Body> {
    answer(grpc, StatusCode::SERVICE_UNAVAILABLE, 14, "service_gone", "the service is no longer in the mesh")
}

/// The answer when the request's time ran out: 504, or for gRPC
/// `DEADLINE_EXCEEDED` (code 4).
fn timed_out(grpc: bool, after: Duration) -> Response<Body> {
    answer(grpc, StatusCode::GATEWAY_TIMEOUT, 4, "timeout", &format!("no answer within {after:?}"))
}

/// The answer over the rate limit: 429 with `Retry-After`, or for gRPC
/// `RESOURCE_EXHAUSTED` (code 8).
fn rate_limited(grpc: bool, wait: Duration) -> Response<Body> {
    let mut r = answer(grpc, StatusCode::TOO_MANY_REQUESTS, 8, "rate-limited", "over the service's rate limit");
    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    r
}

/// `grpc-timeout` (RFC: up to 8 digits and a unit of H, M, S, m, u, n).
fn grpc_timeout(h: &HeaderMap) -> Option<Duration> {
    const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
    let v = h.get(GRPC_TIMEOUT)?.to_str().ok()?;
    let (n, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = n.parse().ok().filter(|_| (1..=8).contains(&n.len()))?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// How long the whole request may take until its response headers: the
/// timeout of its rules, or a shorter `grpc-timeout` the gRPC client sent.
fn request_timeout(rules: &Rules<'_>, grpc: bool, h: &HeaderMap) -> Option<Duration> {
    let client = grpc.then(|| grpc_timeout(h)).flatten();
    match (rules.timeout, client) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The retry policy, if this request may be sent again: an idempotent
/// method (any gRPC call) unless the policy lists the methods.
fn retry_policy<'p>(rules: &Rules<'p>, method: &hyper::Method, grpc: bool) -> Option<&'p RetryPolicy> {
    let r = rules.retries?;
    let ok = match &r.methods {
        Some(m) => m.contains(method),
        None => grpc || method.is_idempotent(),
    };
    ok.then_some(r)
}

/// Whether an answer (its head) is one the policy retries.
fn retried_answer<B>(r: &RetryPolicy, head: &Response<B>, grpc: bool) -> bool {
    r.on.status(head.status().as_u16())
        || (grpc && observe::grpc_status(head.headers()).is_some_and(|c| r.on.grpc_status(c)))
}

fn bad_request(why: &'static str) -> Response<Body> {
    let body = Full::new(Bytes::from_static(why.as_bytes())).map_err(|never| match never {}).boxed_unsync();
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::BAD_REQUEST;
    r
}

/// An error with its causes, `outer: inner: ...`.
pub(super) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        s.push_str(": ");
        s.push_str(&c.to_string());
        source = c.source();
    }
    s
}

/// An upgrade or `CONNECT`: one endpoint, a connection of its own, then
/// bytes both ways (see [`upgrade`]). Not retried: the client's side is
/// handed over with the request.
async fn upgraded(req: Request<UpstreamBody>, conn: &Conn, route: &Arc<Route>, started: Instant) -> Response<Body> {
    let finished = Finished::new(conn, route, req.method(), &absolute(&req).unwrap_or_else(|| req.uri().clone()));
    let env = conn.env;
    let Some(i) = route.pick_index(&[], env) else {
        return finished.failed("no_endpoint", started, unavailable(false, "no_endpoint"));
    };
    let ep = &route.endpoints[i];
    let dial = match conn::dial(ep, route, conn) {
        Ok(d) => d,
        Err(e) => {
            super::tries::blame(ep, &e, env);
            return finished.failed(e.reason(), started, unavailable(false, e.reason()));
        }
    };
    let connector = upstream::Connector::new(dial.clone(), conn.tunnel.clone(), route.connect_timeout, None);
    match upgrade::forward(req, dial, &connector, conn.idle).await {
        Ok(resp) => {
            let now = env.now();
            ep.state.connected(now - started, now);
            let (head, body) = resp.into_parts();
            let observed = Observed::new(body, finished.at(i, &head, started, now));
            Response::from_parts(head, observed.boxed_unsync())
        }
        Err(e) => {
            let reason = match &e {
                upstream::SendError::Connect(c) => {
                    super::tries::blame(ep, c, env);
                    c.reason()
                }
                upstream::SendError::Http(_) | upstream::SendError::H2(_) => "upstream",
            };
            warn!(service = %route.name, endpoint = %ep.state.addr, error = %e, "upgrade could not reach the endpoint");
            finished.failed(reason, started, unavailable(false, reason))
        }
    }
}

/// A failed answer or a try that ran out of time: counted against `ep`,
/// which may be ejected through its breaker (see [`Route::may_eject`]).
fn failed_answer(route: &Route, ep: &RouteEndpoint, env: &dyn Env) {
    let now = env.now();
    let threshold = route.policy.cfg.outlier.map_or(0, |o| o.consecutive_failures);
    if ep.state.answered(false, threshold, route.may_eject(now), now, env.unit()) == Answered::Ejected {
        ep.series().ejections.inc();
        warn!(service = %route.name, endpoint = %ep.state.addr, "failed answers in a row: endpoint ejected");
    }
}

/// Routes one request, in stages: the connection's current route for the
/// service port dialled ([`Conn::resolve`]); the routes attached to it
/// (the frontend stage, [`frontend`]), which choose the backend Service
/// or answer; that Service's rate limit; then its policy and the tries
/// over its endpoints (the backend stage, [`backend`]).
async fn handle(req: Request<UpstreamBody>, conn: &Conn) -> Response<Body> {
    let started = conn.env.now();
    let Some(frontend) = conn.resolve() else {
        return gone(conn.grpc);
    };
    let Some(uri) = absolute(&req) else {
        return bad_request("the request names no host\n");
    };
    if header_list_size(req.headers()) > conn.max_headers {
        // HTTP/2 refuses these itself (SETTINGS_MAX_HEADER_LIST_SIZE);
        // hyper's HTTP/1.1 read buffer only roughly.
        too_large(conn);
        return answer(
            conn.grpc,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            8,
            "headers_too_large",
            "the request headers are over the limit",
        );
    }
    let wants_upgrade = req.version() != Version::HTTP_2 && upgrade::wanted(&req);
    let (mut parts, body) = req.into_parts();
    parts.uri = uri;
    let router = frontend.route.router.clone();
    let Target { resolved, routed, by } = match frontend::target(conn, frontend, router.as_ref(), &mut parts, started) {
        Decided::To(t) => t,
        Decided::Answer(answer) => return answer,
    };
    let route = &resolved.route;
    if wants_upgrade {
        return upgraded(Request::from_parts(parts, body), conn, route, started).await;
    }
    strip_hop_by_hop(&mut parts.headers);
    strip_mesh_headers(&mut parts.headers);
    let mut finished = Finished::new(conn, route, &parts.method, &parts.uri);
    finished.by(by);
    finished.trace(trace::Traced::of(&mut parts.headers, &conn.spans));
    if let Err(wait) = admit(conn, route) {
        return finished.failed("rate_limited", started, rate_limited(conn.grpc, wait));
    }
    let plan = backend::Plan::new(conn, &resolved, routed, &parts, body, started);
    plan.run(parts, finished).await
}

/// The service's rate limit, for the client's identity: Err with how long
/// until a request would be admitted.
fn admit(conn: &Conn, route: &Route) -> Result<(), Duration> {
    let Some(limiter) = &route.policy.limiter else { return Ok(()) };
    let identity = conn.source.as_ref().map(|w| &w.identity);
    let secs = conn.env.secs();
    limiter.admit(identity, secs).inspect_err(|_| {
        route.series().rate_limited.inc();
        if limiter.should_log(secs as u64) {
            warn!(service = %route.name, identity = identity.map(tracing::field::display), "over the rate limit: 429 (logged once a second)");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, host: Option<&'static str>) -> Request<()> {
        let mut b = Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header(header::HOST, h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn an_http1_request_is_made_absolute_from_its_host() {
        let abs = |uri, host| absolute(&req(uri, host)).map(|u| u.to_string());
        assert_eq!(abs("/a/b?x=1", Some("web.default:8080")).as_deref(), Some("http://web.default:8080/a/b?x=1"));
        assert_eq!(abs("*", Some("web")).as_deref(), Some("http://web*"), "OPTIONS *: the path as sent");
        assert_eq!(abs("http://api/x", Some("web")).as_deref(), Some("http://api/x"), "absolute form: the URI's");
        assert_eq!(abs("/x", None), None, "no host");
        assert_eq!(abs("/x", Some("web/evil")), None, "a host that is no authority");
        assert_eq!(abs("/x", Some("")), None);
    }

    #[test]
    fn hop_by_hop_and_mesh_headers_are_stripped_and_nothing_else() {
        let map = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (n, v) in pairs {
                h.append(*n, HeaderValue::from_static(v));
            }
            h
        };
        let names = |h: &HeaderMap| {
            let mut n: Vec<_> = h.keys().map(|k| k.as_str().to_owned()).collect();
            n.sort();
            n
        };
        let plain = [("host", "web"), ("content-type", "text/plain"), ("te", "trailers"), ("x-a", "1")];
        let mut h = map(&plain);
        strip_hop_by_hop(&mut h);
        strip_mesh_headers(&mut h);
        assert_eq!(h, map(&plain), "nothing to strip: unchanged");

        let mut h = map(&[
            ("host", "web"),
            ("connection", "close, X-Named"),
            ("x-named", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "secret"),
            ("te", "gzip"),
            ("mesh-source", "10.0.0.1:1"),
            ("x-forwarded-client-cert", "By=spiffe://x"),
            ("x-b", "2"),
        ]);
        strip_hop_by_hop(&mut h);
        strip_mesh_headers(&mut h);
        assert_eq!(names(&h), ["host", "x-b"]);

        let mut h = map(&[("te", "gzip")]);
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty(), "te other than trailers, alone");
        let mut h = map(&[("x-forwarded-client-cert", "By=spiffe://x")]);
        strip_mesh_headers(&mut h);
        assert!(h.is_empty(), "xfcc alone");
    }
}
