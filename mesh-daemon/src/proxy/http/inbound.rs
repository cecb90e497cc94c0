//! Requests arriving through the tunnel from another node's proxy, which
//! terminated its client's HTTP (the stream's `mesh-protocol`): each one
//! is forwarded to the pod over this node's pooled connections to it
//! (`upstream::Endpoint`, which dials again when the pod ended one as
//! servers do after an idle time or a number of requests), counted by
//! class with `direction="inbound"`, timed, and logged with the peer's
//! identity. The checks (target, service, policy) were made for the
//! stream before it was accepted.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::observe::{class, failed, grpc_status, Completion, Line, Observed, Report};
use super::trace::Traced;
use super::upstream::{Body, Endpoint, UpstreamBody};
use super::{answer, forbidden, strip_hop_by_hop, strip_mesh_headers};
use crate::drain::Drain;
use crate::identity::Identity;
use crate::model::authz::Request as AuthzRequest;
use crate::proxy::access::{Record, RequestLine};
use crate::proxy::inbound::Inbound;
use crate::proxy::inbound::Target;
use crate::telemetry::otlp::Spans;
use crate::tunnel::client::Stream;
use crate::tunnel::server::StreamRequest;
use crate::tunnel::StreamProtocol;
use crate::tunnel::SOURCE_HEADER;
use arc_swap::ArcSwap;

/// How long an HTTP/1.1 stream may wait for its next request: longer than
/// the sending proxy keeps an idle pooled connection, so that side closes
/// first and never sends on a connection this side is closing.
const IDLE: Duration = Duration::from_secs(90);

/// The largest header block a peer proxy's request may have here: the
/// sending proxy enforced its client's limit (`--max-request-headers`,
/// at most 16 MiB), so this side takes what any such limit lets through
/// and a request is decided the same wherever its endpoint runs.
const PEER_HEADERS: usize = (16 << 20) + 8192;

/// What every request of one stream shares.
struct Ctx {
    pod: Arc<Endpoint>,
    peer: Arc<Identity>,
    addr: SocketAddr,
    target: Arc<Target>,
    spans: Arc<Spans>,
    /// This node's checks as they are now: each request is authorized
    /// against the current policies.
    view: Arc<ArcSwap<Inbound>>,
}

/// Serves the requests of one stream until the sending proxy closes it, or
/// the drain ends it gracefully. Boxed, as [`super::serve`] is: the task
/// that carries a tunnel stream relays it when it carries no requests, and
/// would otherwise be sized by this state too.
pub fn serve(
    stream: Stream,
    pod: Arc<Endpoint>,
    protocol: StreamProtocol,
    req: StreamRequest,
    target: Arc<Target>,
    ctx: (Arc<Spans>, Arc<ArcSwap<Inbound>>),
    drain: Drain,
) -> futures_util::future::BoxFuture<'static, ()> {
    Box::pin(serve_stream(stream, pod, protocol, req, target, ctx, drain))
}

async fn serve_stream(
    stream: Stream,
    pod: Arc<Endpoint>,
    protocol: StreamProtocol,
    req: StreamRequest,
    target: Arc<Target>,
    (spans, view): (Arc<Spans>, Arc<ArcSwap<Inbound>>),
    drain: Drain,
) {
    let ctx = Arc::new(Ctx { pod, peer: req.peer, addr: req.target, target, spans, view });
    let svc = hyper::service::service_fn(move |r| {
        let ctx = ctx.clone();
        Box::pin(async move { Ok::<_, Infallible>(ctx.forward(r).await) })
    });
    let io = TokioIo::new(stream);
    let ended = match protocol {
        StreamProtocol::Http1 => {
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new()).keep_alive(true).header_read_timeout(IDLE).max_buf_size(PEER_HEADERS);
            drain.serve(b.serve_connection(io, svc), |c| c.graceful_shutdown()).await
        }
        StreamProtocol::Http2 => {
            let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            b.timer(TokioTimer::new()).max_concurrent_streams(1024).max_header_list_size(PEER_HEADERS as u32);
            drain.serve(b.serve_connection(io, svc), |c| c.graceful_shutdown()).await
        }
    };
    if let Err(e) = ended {
        debug!(target = %req.target, error = %super::chain(&e), "inbound request stream ended");
    }
}

impl Ctx {
    /// The policies' decision for `req`: the policy and rule that allowed
    /// it (if one did), or Err with the 403 (gRPC: PERMISSION_DENIED) and
    /// the one that denied it.
    #[allow(clippy::result_large_err)]
    fn authorize(
        &self,
        req: &Request<Incoming>,
        source: Option<std::net::IpAddr>,
    ) -> Result<crate::proxy::authz::Logged, (Response<Body>, crate::proxy::authz::Logged)> {
        let view = self.view.load();
        if !view.guard.enforcing() {
            return Ok(Default::default());
        }
        let caller = view.guard.caller(Some(&self.peer), source);
        let host =
            req.uri().authority().map(|a| a.as_str()).or_else(|| req.headers().get(hyper::header::HOST)?.to_str().ok());
        let r = AuthzRequest {
            method: req.method().as_str(),
            path: req.uri().path(),
            host: host.unwrap_or(""),
            headers: req.headers(),
        };
        view.guard
            .check(&self.target.service, self.addr, &caller, Some(&r), self.target.metrics(), crate::env::live())
            .map_err(|d| (forbidden(self.target.grpc), d.logged()))
    }

    async fn forward(&self, mut req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        strip_hop_by_hop(req.headers_mut());
        // The client's address as the sending proxy wrote it; nothing of
        // the mesh's own goes on to the workload.
        let source = req.headers().get(SOURCE_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
        strip_mesh_headers(req.headers_mut());
        if self.target.forward_client_cert {
            let view = self.view.load();
            let server = view.guard.identity_at(self.addr.ip());
            if let Some(v) = crate::proxy::authz::client_cert_header(server, &self.peer) {
                req.headers_mut().insert(crate::proxy::authz::XFCC, v);
            }
        }
        let line = Line::new(req.method(), req.uri(), req.headers());
        let authz = match self.authorize(&req, source) {
            Ok(logged) => logged,
            Err((r, logged)) => {
                let (target, peer, addr) = (self.target.clone(), self.peer.clone(), self.addr);
                let mut report = Reported { target, peer, addr, line, started, traced: None, authz: logged };
                report.report(r.status(), grpc_status(r.headers()), 0, "denied");
                return r;
            }
        };
        let traced = Traced::of(req.headers_mut(), &self.spans);
        let sent = self.pod.request(req.map(|b| UpstreamBody::from(b).boxed_unsync())).await;
        let mut report = Reported {
            target: self.target.clone(),
            peer: self.peer.clone(),
            addr: self.addr,
            line,
            started,
            traced,
            authz,
        };
        match sent {
            Ok(resp) => {
                let latency = started.elapsed();
                self.target.series().latency.observe(latency);
                self.target.response_latency().observe(latency.as_secs_f64());
                let (mut head, body) = resp.into_parts();
                strip_hop_by_hop(&mut head.headers);
                let observed = Observed::new(body, Completion::new(report, &head));
                Response::from_parts(head, observed.boxed_unsync())
            }
            Err(e) => {
                warn!(identity = %self.peer, target = %self.addr, error = %super::chain(&e), "request to the workload failed");
                let r = answer(
                    self.target.grpc,
                    StatusCode::BAD_GATEWAY,
                    14,
                    "upstream",
                    "the workload failed the request",
                );
                report.report(r.status(), grpc_status(r.headers()), 0, "upstream");
                r
            }
        }
    }
}

/// An inbound request, counted and logged when its response ends.
struct Reported {
    target: Arc<Target>,
    peer: Arc<Identity>,
    addr: SocketAddr,
    line: Line,
    started: Instant,
    traced: Option<Traced>,
    /// The authorization policies that decided it, and audited it.
    authz: crate::proxy::authz::Logged,
}

impl Report for Reported {
    fn report(&mut self, status: StatusCode, grpc_status: Option<u32>, bytes: u64, outcome: &'static str) {
        let series = self.target.series();
        // One clock read for the rate and the log's duration.
        let now = Instant::now();
        series.request(class(status, self.target.grpc, grpc_status), crate::env::secs_at(now));
        series.received.inc_by(bytes);
        Record {
            direction: "inbound",
            source: None,
            identity: Some(&self.peer),
            client: None,
            service: &series.labels.service,
            endpoint: Some(self.addr),
            node: Some("local"),
            bytes_up: None,
            bytes_down: bytes,
            duration: now - self.started,
            outcome,
            error: None,
            request: Some(RequestLine {
                trace_id: self.traced.as_ref().map(|t| t.trace_hex.as_str()),
                authz: self.authz.by.as_deref(),
                audit: self.authz.audit.as_deref(),
                ..self.line.with(status, grpc_status)
            }),
        }
        .log(self.target.access_log, crate::env::live());
        if let Some(t) = &self.traced {
            let error = outcome != "ok" || failed(status, self.target.grpc, grpc_status);
            let (service, s) = (&series.labels.service, status.as_u16());
            t.finish("inbound", service, Some(self.addr), self.line.parts(), s, grpc_status, 0, error);
        }
    }
}
