//! Spans of sampled requests, exported over OTLP (`--otlp-endpoint`,
//! HTTP/protobuf or gRPC) in batches of up to [`BATCH`] or every
//! [`FLUSH`]. The queue in front of the exporter is bounded: when the
//! collector is slow or down, spans are dropped and counted
//! (`mesh_spans_dropped_total`), never waited for: a request never waits
//! on tracing.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{span, status, ResourceSpans, ScopeSpans, Span, Status};
use prometheus_client::metrics::counter::Counter;
use prost::Message;
use tokio::sync::mpsc;
use tracing::warn;

/// Spans waiting for the exporter; beyond them new ones are dropped.
const QUEUE: usize = 4096;
/// Spans per export.
const BATCH: usize = 512;
/// How long a span may wait for its batch.
const FLUSH: Duration = Duration::from_secs(1);
/// How long one export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// How spans reach the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OtlpProtocol {
    /// POST `<endpoint>/v1/traces`, a protobuf body (OTLP's default).
    #[value(name = "http/protobuf")]
    HttpProtobuf,
    /// `TraceService/Export` over HTTP/2 without TLS.
    Grpc,
}

/// One finished request, as a span.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent: [u8; 8],
    /// `outbound` (a client span) or `inbound` (a server span).
    pub direction: &'static str,
    pub start: SystemTime,
    pub end: SystemTime,
    pub service: String,
    pub endpoint: Option<SocketAddr>,
    pub method: String,
    pub authority: String,
    pub path: String,
    pub status: u16,
    pub grpc_status: Option<u32>,
    pub retries: u32,
    /// The request failed (5xx, a failed gRPC status, or the proxy's own answer).
    pub error: bool,
}

/// Where the proxy puts spans; a no-op without `--otlp-endpoint`.
#[derive(Debug)]
pub struct Spans {
    tx: Option<mpsc::Sender<SpanRecord>>,
    dropped: Counter,
}

impl Spans {
    pub fn disabled() -> Self {
        Self { tx: None, dropped: Counter::default() }
    }

    /// Whether spans are exported: only then does the proxy record one and
    /// rewrite the trace context's parent.
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn record(&self, span: SpanRecord) {
        if let Some(tx) = &self.tx {
            if tx.try_send(span).is_err() {
                self.dropped.inc();
            }
        }
    }

    /// Starts the exporter to `endpoint` (`http://host:port`); spans name
    /// this node as `k8s.node.name`. Must be called inside the runtime.
    pub fn start(endpoint: Uri, protocol: OtlpProtocol, node: String, counters: SpanCounters) -> Self {
        let SpanCounters { exported, dropped } = counters;
        let (tx, rx) = mpsc::channel(QUEUE);
        let exporter =
            Exporter { endpoint, protocol, node, exported, dropped: dropped.clone(), client: client(protocol) };
        tokio::spawn(exporter.run(rx));
        Self { tx: Some(tx), dropped }
    }
}

/// `mesh_spans_exported_total` and `mesh_spans_dropped_total`.
pub struct SpanCounters {
    pub exported: Counter,
    pub dropped: Counter,
}

impl SpanCounters {
    /// Registers both into `m` (once per daemon).
    pub fn new(m: &super::Metrics) -> Self {
        let (exported, dropped) = (Counter::default(), Counter::default());
        m.register("spans_exported", "Spans of sampled requests the OTLP collector took", exported.clone());
        m.register(
            "spans_dropped",
            "Spans dropped: the queue to the collector was full, or their export failed",
            dropped.clone(),
        );
        Self { exported, dropped }
    }
}

type Body = Full<Bytes>;

fn client(protocol: OtlpProtocol) -> Client<HttpConnector, Body> {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).http2_only(protocol == OtlpProtocol::Grpc).build(connector)
}

struct Exporter {
    endpoint: Uri,
    protocol: OtlpProtocol,
    node: String,
    exported: Counter,
    dropped: Counter,
    client: Client<HttpConnector, Body>,
}

impl Exporter {
    async fn run(self, mut rx: mpsc::Receiver<SpanRecord>) {
        let mut last_warning: Option<tokio::time::Instant> = None;
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            let flush_at = tokio::time::Instant::now() + FLUSH;
            while batch.len() < BATCH {
                match tokio::time::timeout_at(flush_at, rx.recv()).await {
                    Ok(Some(s)) => batch.push(s),
                    Ok(None) | Err(_) => break,
                }
            }
            let n = batch.len() as u64;
            match tokio::time::timeout(EXPORT_TIMEOUT, self.export(batch)).await {
                Ok(Ok(())) => {
                    self.exported.inc_by(n);
                }
                failed => {
                    self.dropped.inc_by(n);
                    let why = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer within {EXPORT_TIMEOUT:?}"),
                    };
                    // At most one line a minute while the collector is away.
                    if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                        last_warning = Some(tokio::time::Instant::now());
                        warn!(endpoint = %self.endpoint, spans = n, error = %why, "span export failed; spans dropped (logged once a minute)");
                    }
                }
            }
        }
    }

    async fn export(&self, batch: Vec<SpanRecord>) -> Result<(), ExportError> {
        let msg = request(&self.node, batch).encode_to_vec();
        let base = self.endpoint.to_string();
        let base = base.trim_end_matches('/');
        let (uri, body, content_type) = match self.protocol {
            OtlpProtocol::HttpProtobuf => (format!("{base}/v1/traces"), Bytes::from(msg), "application/x-protobuf"),
            OtlpProtocol::Grpc => {
                let mut framed = BytesMut::with_capacity(msg.len() + 5);
                framed.put_u8(0);
                framed.put_u32(msg.len() as u32);
                framed.put_slice(&msg);
                let uri = format!("{base}/opentelemetry.proto.collector.trace.v1.TraceService/Export");
                (uri, framed.freeze(), "application/grpc")
            }
        };
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = uri.parse().map_err(|e| ExportError::Uri(format!("{uri}: {e}")))?;
        req.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
        if self.protocol == OtlpProtocol::Grpc {
            req.headers_mut().insert(hyper::header::TE, hyper::header::HeaderValue::from_static("trailers"));
        }
        let resp = self.client.request(req).await.map_err(|e| ExportError::Send(e.to_string()))?;
        let status = resp.status();
        let head_grpc = resp.headers().get("grpc-status").cloned();
        let collected = resp.into_body().collect().await.map_err(|e| ExportError::Send(e.to_string()))?;
        if status != StatusCode::OK {
            return Err(ExportError::Status(status));
        }
        if self.protocol == OtlpProtocol::Grpc {
            let code = head_grpc.or_else(|| collected.trailers().and_then(|t| t.get("grpc-status").cloned()));
            match code.as_ref().and_then(|c| c.to_str().ok()) {
                Some("0") => {}
                other => return Err(ExportError::Grpc(other.unwrap_or("none").to_owned())),
            }
        }
        Ok(())
    }
}

/// Why a batch of spans did not reach the collector.
#[derive(Debug, thiserror::Error)]
enum ExportError {
    #[error("not a URI: {0}")]
    Uri(String),
    #[error("sending to the collector: {0}")]
    Send(String),
    #[error("the collector answered {0}")]
    Status(StatusCode),
    #[error("the collector answered gRPC status {0}")]
    Grpc(String),
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

fn kv(key: &str, v: any_value::Value) -> KeyValue {
    KeyValue { key: key.to_owned(), value: Some(AnyValue { value: Some(v) }), ..Default::default() }
}

fn text(key: &str, v: &str) -> KeyValue {
    kv(key, any_value::Value::StringValue(v.to_owned()))
}

fn int(key: &str, v: i64) -> KeyValue {
    kv(key, any_value::Value::IntValue(v))
}

/// The OTLP message of one batch: one resource (this node's proxy).
pub fn request(node: &str, batch: Vec<SpanRecord>) -> ExportTraceServiceRequest {
    let spans = batch
        .into_iter()
        .map(|s| {
            let mut attributes = vec![
                text("mesh.direction", s.direction),
                text("mesh.service", &s.service),
                text("http.request.method", &s.method),
                text("server.address", &s.authority),
                text("url.path", &s.path),
                int("http.response.status_code", i64::from(s.status)),
                int("mesh.retries", i64::from(s.retries)),
            ];
            if let Some(e) = s.endpoint {
                attributes.push(text("mesh.endpoint", &e.to_string()));
            }
            if let Some(g) = s.grpc_status {
                attributes.push(int("rpc.grpc.status_code", i64::from(g)));
            }
            let kind = if s.direction == "inbound" { span::SpanKind::Server } else { span::SpanKind::Client };
            Span {
                trace_id: s.trace_id.to_vec(),
                span_id: s.span_id.to_vec(),
                parent_span_id: s.parent.to_vec(),
                name: format!("{} {}", s.direction, s.service),
                kind: kind as i32,
                start_time_unix_nano: nanos(s.start),
                end_time_unix_nano: nanos(s.end),
                attributes,
                status: Some(Status {
                    code: if s.error { status::StatusCode::Error } else { status::StatusCode::Unset } as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![text("service.name", "mesh-proxy"), text("k8s.node.name", node)],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "mesh-daemon".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}
