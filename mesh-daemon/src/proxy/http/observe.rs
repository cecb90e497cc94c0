//! The end of a request: its response body is watched to the end (bytes,
//! gRPC status in the trailers), then the request is counted by class and
//! logged once, however it ended.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use hyper::header::{HeaderMap, HeaderName};
use hyper::http::response::Parts as ResponseParts;
use hyper::http::uri::PathAndQuery;
use hyper::{Method, Response, StatusCode};
use tokio::time::Instant;

use super::trace::Traced;
use super::upstream::{Body, BodyError};
use super::Conn;
use crate::proxy::access::{Record, RequestLine};
use crate::proxy::{Route, RouteEndpoint, RuleMeter, Workload};
use crate::telemetry::metrics::{GRPC_CLASSES, REQUEST_CLASSES};

/// What the access log says of a request: the request's own parts,
/// shared (their bytes are reference-counted), not copied.
pub struct Line {
    method: Method,
    /// From the URI, else from `Host` (an HTTP/1 request).
    authority: Authority,
    /// The path is read without the query string, which may hold secrets.
    path: Option<PathAndQuery>,
}

enum Authority {
    Uri(hyper::http::uri::Authority),
    Host(hyper::header::HeaderValue),
    None,
}

impl Line {
    /// `authority` from the URI, else from `Host` (an HTTP/1 request).
    pub fn new(method: &Method, uri: &hyper::Uri, headers: &HeaderMap) -> Self {
        let authority = match (uri.authority(), headers.get(hyper::header::HOST)) {
            (Some(a), _) => Authority::Uri(a.clone()),
            (None, Some(h)) if h.to_str().is_ok() => Authority::Host(h.clone()),
            _ => Authority::None,
        };
        Self { method: method.clone(), authority, path: uri.path_and_query().cloned() }
    }

    /// (method, authority, path), for a span.
    pub fn parts(&self) -> (&str, &str, &str) {
        let authority = match &self.authority {
            Authority::Uri(a) => a.as_str(),
            Authority::Host(h) => h.to_str().unwrap_or_default(),
            Authority::None => "",
        };
        // As `Uri::path` reads it: none in authority form (`CONNECT`).
        let path = self.path.as_ref().map_or("", |p| p.path());
        (self.method.as_str(), authority, path)
    }

    pub fn with(&self, status: StatusCode, grpc_status: Option<u32>) -> RequestLine<'_> {
        let (method, authority, path) = self.parts();
        RequestLine {
            trace_id: None,
            method,
            authority,
            path,
            status: status.as_u16(),
            grpc_status,
            retries: 0,
            route: None,
            authz: None,
            audit: None,
        }
    }
}

/// What is known of a request before it is sent: enough to log it.
pub struct Finished {
    line: Line,
    /// Tries after the first, for the access log.
    pub retries: u32,
    /// Its trace, when it came with one; with a span when recorded.
    traced: Option<Traced>,
    source: Option<Arc<Workload>>,
    client: std::net::SocketAddr,
    grpc: bool,
    route: Arc<Route>,
    /// The route rule that decided the request, and its backend.
    by: Option<DecidedBy>,
    /// The authorization policies that decided it, and audited it.
    pub authz: crate::proxy::authz::Logged,
    env: &'static dyn crate::env::Env,
}

/// The route rule (Gateway API) that decided a request, with what it
/// counts into, and the backend it chose (an index into the rule's
/// backends; None: the proxy answered, with a redirect or 500).
#[derive(Clone)]
pub struct DecidedBy {
    pub meter: Arc<RuleMeter>,
    pub backend: Option<usize>,
}

/// Where a request that reached an endpoint is counted and logged once
/// its response ends: on this node's outbound side, or its inbound side.
pub trait Report: Send + 'static {
    fn report(&mut self, status: StatusCode, grpc_status: Option<u32>, bytes: u64, outcome: &'static str);
}

/// A request that reached an endpoint, waiting for its response to end.
pub struct Completion<R: Report> {
    report: R,
    status: StatusCode,
    grpc_status: Option<u32>,
    bytes: u64,
}

impl<R: Report> Completion<R> {
    /// The response with this head began.
    pub fn new(report: R, head: &ResponseParts) -> Self {
        Self { report, status: head.status, grpc_status: grpc_status(&head.headers), bytes: 0 }
    }

    fn end(self, trailers: Option<&HeaderMap>, outcome: &'static str) {
        let Self { mut report, status, grpc_status: in_head, bytes } = self;
        let grpc_status = trailers.and_then(grpc_status).or(in_head);
        report.report(status, grpc_status, bytes, outcome);
    }
}

/// An outbound request at endpoint `endpoint` (index into the route's).
pub struct AtEndpoint {
    finished: Finished,
    endpoint: usize,
    started: Instant,
}

impl Report for AtEndpoint {
    fn report(&mut self, status: StatusCode, grpc_status: Option<u32>, bytes: u64, outcome: &'static str) {
        let route = &self.finished.route;
        let ep = &route.endpoints[self.endpoint];
        let series = ep.series();
        let env = self.finished.env;
        // One clock read for the endpoint's answer, the rates and the
        // log's duration.
        let now = env.now();
        let secs = crate::env::secs_at(now);
        series.request(class(status, self.finished.grpc, grpc_status), secs);
        // The response body's bytes, as the inbound side counts them: a
        // request port's pooled upstream connection may never close.
        series.received.inc_by(bytes);
        if failed(status, self.finished.grpc, grpc_status) {
            super::failed_answer(route, ep, env);
        } else {
            ep.state.answered(true, 0, false, now, env.unit());
        }
        self.finished.log(Some(ep), status, grpc_status, bytes, (now - self.started, secs), outcome);
    }
}

/// Whether an answer counts against its endpoint: HTTP 5xx; for gRPC the
/// statuses that say the server failed (UNKNOWN, INTERNAL, UNAVAILABLE,
/// DATA_LOSS), or a 5xx without a status.
pub fn failed(status: StatusCode, grpc: bool, grpc_status: Option<u32>) -> bool {
    match (grpc, grpc_status) {
        (true, Some(c)) => matches!(c, 2 | 13 | 14 | 15),
        _ => status.is_server_error(),
    }
}

/// The metrics class of a response: its gRPC status for gRPC (UNKNOWN
/// when a gRPC call ended without one), else its HTTP status class.
pub fn class(status: StatusCode, grpc: bool, grpc_status: Option<u32>) -> &'static str {
    if grpc {
        return grpc_status
            .filter(|c| *c <= 16)
            .and_then(|c| REQUEST_CLASSES.get(GRPC_CLASSES + c as usize))
            .copied()
            .unwrap_or("UNKNOWN");
    }
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

pub fn grpc_status(h: &HeaderMap) -> Option<u32> {
    const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
    h.get(GRPC_STATUS)?.to_str().ok()?.parse().ok()
}

impl Finished {
    /// `uri` in absolute form (see `absolute`), for its authority.
    pub fn new(conn: &Conn, route: &Arc<Route>, method: &Method, uri: &hyper::Uri) -> Self {
        Self {
            line: Line::new(method, uri, &HeaderMap::new()),
            retries: 0,
            traced: None,
            source: conn.source.clone(),
            client: conn.client,
            grpc: conn.grpc,
            route: route.clone(),
            by: None,
            authz: Default::default(),
            env: conn.env,
        }
    }

    /// The request was decided by a route rule: its log line says which,
    /// and `mesh_route_requests_total` counts it.
    pub fn by(&mut self, by: Option<DecidedBy>) {
        self.by = by;
    }

    /// The answer's head came `took` after the request: its rule's
    /// latency.
    fn answered_at(&self, took: Duration) {
        if let Some(b) = &self.by {
            b.meter.series.answered(took);
        }
    }

    /// The proxy answers now: the clock read once, for the rule's
    /// latency and what the log and the rates take (the time since
    /// `started`, and the second).
    fn answered_now(&self, started: Instant) -> (Duration, u64) {
        let now = self.env.now();
        let took = now - started;
        self.answered_at(took);
        (took, crate::env::secs_at(now))
    }

    pub fn trace(&mut self, traced: Option<Traced>) {
        self.traced = traced;
    }

    /// The request reached an endpoint of `route` and its response began
    /// (at `now`, read by the caller); `endpoint` indexes
    /// `route.endpoints`.
    pub fn at(self, endpoint: usize, head: &ResponseParts, started: Instant, now: Instant) -> Completion<AtEndpoint> {
        self.answered_at(now - started);
        Completion::new(AtEndpoint { finished: self, endpoint, started }, head)
    }

    /// The request reached no endpoint: counted and logged now.
    pub fn failed(self, reason: &'static str, started: Instant, response: Response<Body>) -> Response<Body> {
        let status = response.status();
        let grpc_status = grpc_status(response.headers());
        let class = class(status, self.grpc, grpc_status);
        let ended = self.answered_now(started);
        self.route.series().request_failed(class);
        self.route.series().failed(reason);
        self.log(None, status, grpc_status, 0, ended, reason);
        response
    }

    /// The proxy answered the request itself as a route said (a
    /// redirect): counted as a request that reached no endpoint, not as a
    /// failure, and logged with `outcome`.
    pub fn answered(self, outcome: &'static str, started: Instant, response: Response<Body>) -> Response<Body> {
        let status = response.status();
        let ended = self.answered_now(started);
        self.route.series().request_failed(class(status, self.grpc, None));
        self.log(None, status, None, 0, ended, outcome);
        response
    }

    fn log(
        &self,
        ep: Option<&RouteEndpoint>,
        status: StatusCode,
        grpc_status: Option<u32>,
        bytes: u64,
        (duration, secs): (Duration, u64),
        outcome: &'static str,
    ) {
        Record {
            direction: "outbound",
            source: self.source.as_ref().map(|w| w.name.as_str()),
            identity: self.source.as_ref().map(|w| &w.identity),
            client: Some(self.client),
            service: &self.route.name,
            endpoint: ep.map(|e| e.state.addr),
            node: ep.map(|e| e.node()),
            bytes_up: None,
            bytes_down: bytes,
            duration,
            outcome,
            error: None,
            request: Some(RequestLine {
                retries: self.retries,
                trace_id: self.traced.as_ref().map(|t| t.trace_hex.as_str()),
                route: self.by.as_ref().map(|b| (&*b.meter.rule.label, &*b.meter.rule.name)),
                authz: self.authz.by.as_deref(),
                audit: self.authz.audit.as_deref(),
                ..self.line.with(status, grpc_status)
            }),
        }
        .log(self.route.access_log, self.env);
        if let Some(b) = &self.by {
            b.meter.finished(b.backend, class(status, self.grpc, grpc_status), secs);
        }
        if let Some(t) = &self.traced {
            let error = outcome != "ok" || failed(status, self.grpc, grpc_status);
            let endpoint = ep.map(|e| e.state.addr);
            let s = status.as_u16();
            t.finish("outbound", &self.route.name, endpoint, self.line.parts(), s, grpc_status, self.retries, error);
        }
    }
}

/// The response body on its way to the client, watched for its end.
pub struct Observed<R: Report> {
    inner: super::upstream::UpstreamBody,
    completion: Option<Completion<R>>,
}

impl<R: Report> Observed<R> {
    pub fn new(inner: impl Into<super::upstream::UpstreamBody>, completion: Completion<R>) -> Self {
        let inner = inner.into();
        Self { inner, completion: Some(completion) }
    }
}

impl<R: Report + Unpin> HttpBody for Observed<R> {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(c), Some(d)) = (self.completion.as_mut(), frame.data_ref()) {
                    c.bytes += d.len() as u64;
                }
                if let Some(t) = frame.trailers_ref() {
                    if let Some(c) = self.completion.take() {
                        c.end(Some(t), "ok");
                    }
                }
            }
            Poll::Ready(None) => {
                if let Some(c) = self.completion.take() {
                    c.end(None, "ok");
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(c) = self.completion.take() {
                    c.end(None, "error");
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<R: Report> Drop for Observed<R> {
    fn drop(&mut self) {
        // The client went away before the end, or the body was empty and
        // never polled.
        if let Some(c) = self.completion.take() {
            let outcome = if self.inner.is_end_stream() { "ok" } else { "cancelled" };
            c.end(None, outcome);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_reads_as_the_uri_and_host_say() {
        let parts = |uri: &str, host: Option<&'static str>| {
            let mut h = HeaderMap::new();
            if let Some(v) = host {
                h.insert(hyper::header::HOST, hyper::header::HeaderValue::from_static(v));
            }
            let uri: hyper::Uri = uri.parse().unwrap();
            let line = Line::new(&Method::GET, &uri, &h);
            let (m, a, p) = line.parts();
            assert_eq!(p, uri.path(), "{uri}");
            (m.to_owned(), a.to_owned(), p.to_owned())
        };
        let own = |m: &str, a: &str, p: &str| (m.to_owned(), a.to_owned(), p.to_owned());
        assert_eq!(parts("http://web:80/a?secret=1", Some("other")), own("GET", "web:80", "/a"));
        assert_eq!(parts("http://web", None), own("GET", "web", "/"));
        assert_eq!(parts("/a", Some("web")), own("GET", "web", "/a"));
        assert_eq!(parts("/a", None), own("GET", "", "/a"));
        assert_eq!(parts("web:443", None), own("GET", "web:443", ""));
    }

    #[test]
    fn classes_are_http_status_classes_or_grpc_statuses() {
        assert_eq!(class(StatusCode::OK, false, None), "2xx");
        assert_eq!(class(StatusCode::SERVICE_UNAVAILABLE, false, Some(14)), "5xx");
        assert_eq!(class(StatusCode::OK, true, Some(0)), "OK");
        assert_eq!(class(StatusCode::OK, true, Some(14)), "UNAVAILABLE");
        assert_eq!(class(StatusCode::OK, true, Some(16)), "UNAUTHENTICATED");
        assert_eq!(class(StatusCode::OK, true, Some(99)), "UNKNOWN");
        assert_eq!(class(StatusCode::OK, true, None), "UNKNOWN", "a call that ended without a status");
    }
}
