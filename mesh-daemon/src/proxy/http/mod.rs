//! The request-aware path: the proxy terminates the client's HTTP/1.1 or
//! HTTP/2 connection and routes every request on its own (P2C by weight
//! over peak-EWMA of response-header latency and requests in flight,
//! priority failover, breaker), over pooled upstream connections
//! ([`upstream`]). A connect failure is retried on another endpoint before
//! the request fails; a request no endpoint could take gets 503 (gRPC:
//! `UNAVAILABLE`), never a reset. Each finished request is counted by
//! status class (gRPC: its status) and logged once.

mod conn;
pub mod detect;
mod frontend;
pub mod inbound;
mod mirror;
mod observe;
pub mod policy;
mod replay;
pub mod retry;
pub mod router;
pub mod trace;
mod upgrade;
pub mod upstream;

pub use conn::{Accepted, Conn};

use std::convert::Infallible;
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

use self::frontend::{Decided, Target};
use self::observe::{Finished, Observed};
use self::retry::{NoRetry, Retrying};
use self::upstream::{Body, ConnectedAt};
use super::error::ConnectError;
use super::tries::Tries;
use super::{Route, RouteEndpoint};
use crate::balance::endpoint::Answered;
use crate::drain::{Drain, Ended};
use crate::env::Env;
use crate::model::http::{RetryPolicy, Rules};
use crate::model::route as router_types;
use crate::relay::Watched;

/// Serves one client connection speaking HTTP/1.1 (`http2` false) or
/// HTTP/2 with prior knowledge, until the client closes it or the drain
/// ends it gracefully. An HTTP/1.1 connection waits at most 30 s for the
/// next request's headers; an HTTP/2 one that moves no byte either way for
/// the idle timeout (`--idle-timeout`, as relays) gets a GOAWAY and is
/// closed.
pub async fn serve(stream: TcpStream, conn: Arc<Conn>, drain: Drain) {
    let (http2, idle) = (conn.http2, conn.idle);
    let counters = conn.counters.clone();
    let svc = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(handle(req, &conn).await) }
    });
    let result = if http2 {
        let (io, activity) = Watched::new(stream);
        let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new()).max_concurrent_streams(1024);
        match drain
            .serve_until_idle(b.serve_connection(TokioIo::new(io), svc), |c| c.graceful_shutdown(), activity.idle(idle))
            .await
        {
            Ended::Done(r) => r,
            Ended::Idle(r) => {
                counters.idle_closed.inc();
                debug!(?idle, "HTTP/2 client connection moved nothing for the idle timeout (--idle-timeout); closed");
                r.unwrap_or(Ok(()))
            }
        }
    } else {
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(TokioTimer::new()).keep_alive(true).header_read_timeout(Duration::from_secs(30));
        drain.serve(b.serve_connection(TokioIo::new(stream), svc).with_upgrades(), |c| c.graceful_shutdown()).await
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
    let v = h.get("grpc-timeout")?.to_str().ok()?;
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
fn retried_answer(r: &RetryPolicy, head: &Response<Incoming>, grpc: bool) -> bool {
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
async fn upgraded(req: Request<Incoming>, conn: &Conn, route: &Arc<Route>, started: Instant) -> Response<Body> {
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
    match upgrade::forward(req, dial, connector, conn.idle).await {
        Ok(resp) => {
            let now = env.now();
            ep.state.connected(now - started, now);
            let (head, body) = resp.into_parts();
            let observed = Observed::new(body, finished.at(i, &head, started));
            Response::from_parts(head, observed.boxed_unsync())
        }
        Err(e) => {
            let reason = match &e {
                upgrade::UpgradeError::Connect(c) => {
                    super::tries::blame(ep, c, env);
                    c.reason()
                }
                upgrade::UpgradeError::Http(_) => "upstream",
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

/// Routes one request: picks an endpoint, sends it over that endpoint's
/// pool, and tries again, on another endpoint when there is one:
/// - when connecting fails (as [`Tries`] allows): nothing of the request
///   was sent, so any request goes again;
/// - when the answer, or the end of a try's time, is one the service's
///   retry policy names, the request is one it may repeat (method, body
///   kept whole, see [`replay`]), attempts are left and the retry budget
///   allows one.
///
/// Before it, the service's rate limit; over all of it, the timeout.
async fn handle(req: Request<Incoming>, conn: &Conn) -> Response<Body> {
    let env = conn.env;
    let started = env.now();
    let Some(frontend) = conn.resolve() else {
        return gone(conn.grpc);
    };
    let Some(uri) = absolute(&req) else {
        return bad_request("the request names no host\n");
    };
    let wants_upgrade = req.version() != Version::HTTP_2 && upgrade::wanted(&req);
    let (mut parts, body) = req.into_parts();
    parts.uri = uri;
    // Routes (Gateway API) attached to the service port decide first: the
    // backend service, or the answer.
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
    let mut finished = Finished::new(conn, route, &parts.method, &parts.uri);
    finished.by(by);
    finished.trace(trace::Traced::of(&mut parts.headers, &conn.spans));
    let policy = &route.policy;
    if let Some(limiter) = &policy.limiter {
        let identity = conn.source.as_ref().map(|w| &w.identity);
        if let Err(wait) = limiter.admit(identity, env.secs()) {
            route.series().rate_limited.inc();
            if limiter.should_log(env.secs() as u64) {
                warn!(service = %route.name, identity = identity.map(tracing::field::display), "over the rate limit: 429 (logged once a second)");
            }
            return finished.failed("rate_limited", started, rate_limited(conn.grpc, wait));
        }
    }
    let mut rules = policy.cfg.rules(parts.uri.path());
    if let Some((rule, _)) = routed {
        // The route's timeouts and retries come before the backend
        // service's own.
        rules.timeout = rule.timeout.or(rules.timeout);
        rules.per_try_timeout = rule.backend_timeout.or(rules.per_try_timeout);
        rules.retries = rule.retry.as_ref().or(rules.retries);
    }
    let budget = route.retry_budget(routed.is_some_and(|(r, _)| r.retry.is_some()));
    let timeout = request_timeout(&rules, conn.grpc, &parts.headers);
    let deadline = timeout.map(|t| started + t);
    let retry = retry_policy(&rules, &parts.method, conn.grpc);
    // The route's mirrors this request is copied to (each draws its share).
    let mirrors: Vec<&router_types::Mirror> = routed
        .map(|(rule, b)| {
            rule.filters.mirrors.iter().chain(&b.filters.mirrors).filter(|m| m.takes(env.unit())).collect()
        })
        .unwrap_or_default();
    let keep = retry.map_or(0, |r| r.max_body).max(if mirrors.is_empty() { 0 } else { mirror::MIRROR_BODY });
    let body = (!hyper::body::Body::is_end_stream(&body)).then(|| replay::Replay::new(body.boxed_unsync(), keep));
    if let Some(b) = budget {
        b.deposit(env.secs() as u64);
    }
    let mut tries = Tries::new(route, env);
    let mut reason = "no_endpoint";
    let mut retrying = Retrying { policy: retry, deadline, budget, retried: 0 };
    // Whether one more try may repeat this request, after waiting the
    // backoff (None also when the wait would pass the deadline).
    let again = |retrying: &Retrying| -> Option<Duration> {
        let replayable = body.as_ref().is_none_or(replay::Replay::replayable);
        match retrying.again(replayable, env) {
            Ok(pause) => Some(pause),
            Err(NoRetry::BudgetSpent) => {
                route.series().budget_exhausted.inc();
                None
            }
            Err(_) => None,
        }
    };
    loop {
        let retried = retrying.retried;
        let picked = tries.pick().or_else(|| {
            (retried > 0).then(|| {
                tries.forget_tried();
                tries.pick()
            })?
        });
        let Some((i, ep)) = picked else { break };
        let client = match resolved.client(i, ep, conn) {
            Ok(c) => c,
            Err(e) => {
                super::tries::blame(ep, &e, env);
                warn!(service = %route.name, error = %e, "request refused; not retried");
                return finished.failed(e.reason(), started, unavailable(conn.grpc, e.reason()));
            }
        };
        let b = body.as_ref().map_or_else(empty, replay::Replay::body);
        let in_flight = ep.state.start();
        let t0 = env.now();
        let until = retry::try_deadline(deadline, rules.per_try_timeout, t0);
        let sent = client.request(Request::from_parts(parts.clone(), b));
        let outcome = match until {
            Some(at) => tokio::time::timeout_at(at, sent).await.ok(),
            None => Some(sent.await),
        };
        drop(in_flight);
        match outcome {
            None => {
                // Out of time: dropping the try cancelled it upstream (a
                // stream reset, or the connection closed).
                let now = env.now();
                let waited = now - t0;
                ep.state.observe_rtt(waited, now);
                failed_answer(route, ep, env);
                let overall = deadline.is_some_and(|d| now >= d);
                if !overall {
                    if let Some(pause) = again(&retrying) {
                        retrying.retried += 1;
                        conn.counters.retries.inc();
                        route.series().retries.inc();
                        tokio::time::sleep(pause).await;
                        continue;
                    }
                }
                finished.retries = retrying.retried;
                let after = if overall { timeout.unwrap_or(waited) } else { waited };
                return finished.failed("timeout", started, timed_out(conn.grpc, after));
            }
            Some(Ok(resp)) => {
                // From the send, or from the connect if this request waited for one.
                let since = resp.extensions().get::<ConnectedAt>().map_or(t0, |c| c.0.max(t0));
                let now = env.now();
                let latency = now - since;
                ep.state.observe_rtt(latency, now);
                route.series().response_latency.observe(latency.as_secs_f64());
                ep.series().latency.observe(latency);
                if retry.is_some_and(|r| retried_answer(r, &resp, conn.grpc)) {
                    if let Some(pause) = again(&retrying) {
                        // Dropping the answer resets its stream, or closes
                        // its connection if its body was not read.
                        drop(resp);
                        failed_answer(route, ep, env);
                        retrying.retried += 1;
                        conn.counters.retries.inc();
                        route.series().retries.inc();
                        tokio::time::sleep(pause).await;
                        continue;
                    }
                }
                mirror::send(conn, &mirrors, &parts, body.as_ref());
                let (mut head, body) = resp.into_parts();
                strip_hop_by_hop(&mut head.headers);
                if let Some((rule, b)) = routed {
                    router::rewrite_response(&mut head.headers, rule, b);
                }
                finished.retries = retrying.retried;
                let observed = Observed::new(body, finished.at(i, &head, started));
                return Response::from_parts(head, observed.boxed_unsync());
            }
            Some(Err(e)) => {
                let Some(c) = connect_error(&e) else {
                    // The endpoint took the request and then failed it.
                    warn!(service = %route.name, endpoint = %ep.state.addr, error = %chain(&e), "upstream request failed");
                    failed_answer(route, ep, env);
                    let r =
                        answer(conn.grpc, StatusCode::BAD_GATEWAY, 14, "upstream", "the endpoint failed the request");
                    finished.retries = retrying.retried;
                    return finished.failed("upstream", started, r);
                };
                reason = c.reason();
                if body.as_ref().is_some_and(|b| !b.replayable()) {
                    // Part of the body went with this try: it cannot go again.
                    super::tries::blame(ep, c, env);
                    break;
                }
                if !tries.failed(ep, c, &conn.counters).await {
                    break;
                }
            }
        }
    }
    warn!(service = %route.name, reason, "no endpoint could take the request");
    finished.retries = retrying.retried;
    finished.failed(reason, started, unavailable(conn.grpc, reason))
}
