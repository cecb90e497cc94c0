//! The admin HTTP endpoint (`--admin-listen`, loopback by default):
//! `/live`, `/ready`, `/stats` (JSON counters), `/metrics` (Prometheus)
//! and `/config_dump` (the accepted state as JSON).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use crate::drain::Drain;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, Method, Request, Response, StatusCode};
use tokio::net::TcpListener;

/// Why the daemon is not ready: `/ready` answers 503 with it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct NotReady(pub String);

/// What the admin endpoint reads; implemented by the running daemon.
pub trait AdminSource: Send + Sync + 'static {
    /// Ok when ready; otherwise why not (`/ready` answers 503 with it).
    fn readiness(&self) -> Result<(), NotReady>;
    /// `/stats` as JSON.
    fn stats_json(&self) -> serde_json::Value;
    /// `/metrics` in the Prometheus text format.
    fn metrics(&self) -> String;
    /// `/config_dump`: the accepted state as JSON.
    fn config_dump(&self) -> serde_json::Value;
}

/// Content type of the Prometheus text format.
pub const METRICS_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Connections the admin endpoint serves at once (probes and scrapers
/// need a few); more are closed at once.
pub const MAX_CONNECTIONS: usize = 64;

/// What a listener serves: everything (`--admin-listen`), or only what
/// Prometheus and probes read (`--metrics-listen`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Paths {
    All,
    MetricsOnly,
}

impl Paths {
    fn name(self) -> &'static str {
        match self {
            Paths::All => "admin",
            Paths::MetricsOnly => "metrics",
        }
    }
}

/// Serves until `exit` starts draining (after the daemon's own drain, so
/// probes keep their answers while connections finish). A client has
/// `header_timeout` to send each request's headers.
pub async fn serve(
    listener: TcpListener,
    source: Arc<dyn AdminSource>,
    paths: Paths,
    header_timeout: Duration,
    exit: Drain,
) {
    let name = paths.name();
    let gate = crate::drain::Gate::new(name, MAX_CONNECTIONS);
    crate::drain::accept_loop(listener, name, exit, move |stream, _| {
        let Some(pass) = gate.enter() else { return };
        let source = source.clone();
        tokio::spawn(async move {
            let _pass = pass;
            let svc = hyper::service::service_fn(move |req| {
                let source = source.clone();
                async move { Ok::<_, Infallible>(handle(&req, &*source, paths)) }
            });
            crate::drain::serve_local_http1(stream, svc, header_timeout, name).await;
        });
    })
    .await;
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

fn handle(req: &Request<Incoming>, source: &dyn AdminSource, paths: Paths) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    let path = req.uri().path();
    if paths == Paths::MetricsOnly && !matches!(path, "/metrics" | "/live" | "/ready") {
        return text(StatusCode::NOT_FOUND, "not found: this listener serves /metrics, /live and /ready\n");
    }
    match path {
        "/live" => text(StatusCode::OK, "live\n"),
        "/ready" => match source.readiness() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
        },
        "/stats" => {
            let mut r = text(StatusCode::OK, source.stats_json().to_string());
            r.headers_mut()
                .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
            r
        }
        "/metrics" => {
            let mut r = text(StatusCode::OK, source.metrics());
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(METRICS_TYPE));
            r
        }
        "/config_dump" => {
            let mut r = text(StatusCode::OK, source.config_dump().to_string());
            r.headers_mut()
                .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
            r
        }
        _ => text(StatusCode::NOT_FOUND, "not found: try /live, /ready, /stats, /metrics, /config_dump\n"),
    }
}
