//! An OTLP trace receiver for the tests: HTTP/protobuf (`POST /v1/traces`)
//! and gRPC (`TraceService/Export`, HTTP/2 without TLS) on one port. Each
//! request is decoded with the official protobuf definitions
//! (opentelemetry-proto) and every span appended to `--out` as one JSON
//! line: trace and span ids in hex, name, kind, the string and integer
//! attributes, and the status code.
//!
//! usage: mt-otlp --port PORT --out FILE

use std::convert::Infallible;
use std::io::Write;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes};
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One JSON line per span of `req`.
fn lines(req: &ExportTraceServiceRequest) -> Vec<String> {
    let mut out = Vec::new();
    for rs in &req.resource_spans {
        let node = rs.resource.iter().flat_map(|r| &r.attributes).find(|a| a.key == "k8s.node.name").and_then(|a| {
            match a.value.as_ref()?.value.as_ref()? {
                Value::StringValue(s) => Some(s.clone()),
                _ => None,
            }
        });
        for ss in &rs.scope_spans {
            for s in &ss.spans {
                let mut attrs = serde_json::Map::new();
                for a in &s.attributes {
                    let v = match a.value.as_ref().and_then(|v| v.value.as_ref()) {
                        Some(Value::StringValue(x)) => serde_json::json!(x),
                        Some(Value::IntValue(x)) => serde_json::json!(x),
                        _ => continue,
                    };
                    attrs.insert(a.key.clone(), v);
                }
                let line = serde_json::json!({
                    "node": node,
                    "trace_id": hex(&s.trace_id),
                    "span_id": hex(&s.span_id),
                    "parent_span_id": hex(&s.parent_span_id),
                    "name": s.name,
                    "kind": s.kind,
                    "attributes": attrs,
                    "status": s.status.as_ref().map_or(0, |st| st.code),
                    "duration_ns": s.end_time_unix_nano.saturating_sub(s.start_time_unix_nano),
                });
                out.push(line.to_string());
            }
        }
    }
    out
}

async fn handle(req: Request<hyper::body::Incoming>, out: Arc<Mutex<std::fs::File>>) -> Response<Full<Bytes>> {
    let grpc = req.uri().path() == "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
    let http = req.uri().path() == "/v1/traces";
    let bad = |code: u16| {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = hyper::StatusCode::from_u16(code).unwrap_or(hyper::StatusCode::BAD_REQUEST);
        r
    };
    if !grpc && !http {
        return bad(404);
    }
    let Ok(body) = req.into_body().collect().await.map(|b| b.to_bytes()) else { return bad(400) };
    let mut msg = body.clone();
    if grpc {
        // The gRPC frame: a flag byte and a 4-byte length.
        if msg.len() < 5 {
            return bad(400);
        }
        msg.advance(5);
    }
    let Ok(decoded) = ExportTraceServiceRequest::decode(msg) else { return bad(400) };
    {
        let mut f = out.lock().unwrap_or_else(|p| p.into_inner());
        for l in lines(&decoded) {
            let _ = writeln!(f, "{l}");
        }
        let _ = f.flush();
    }
    let reply = ExportTraceServiceResponse::default().encode_to_vec();
    if grpc {
        let mut framed = vec![0u8];
        framed.extend_from_slice(&(reply.len() as u32).to_be_bytes());
        framed.extend_from_slice(&reply);
        let mut r = Response::new(Full::new(Bytes::from(framed)));
        r.headers_mut().insert("content-type", "application/grpc".parse().unwrap());
        // Trailers-only would need a trailer frame; grpc-status in the
        // head is what a trailers-only answer carries, and is accepted.
        r.headers_mut().insert("grpc-status", "0".parse().unwrap());
        r
    } else {
        let mut r = Response::new(Full::new(Bytes::from(reply)));
        r.headers_mut().insert("content-type", "application/x-protobuf".parse().unwrap());
        r
    }
}

async fn serve(port: u16, out: Arc<Mutex<std::fs::File>>) -> std::io::Result<()> {
    let l = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
    eprintln!("mt-otlp: listening on {port}");
    loop {
        let (s, _) = l.accept().await?;
        let out = out.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let out = out.clone();
                async move { Ok::<_, Infallible>(handle(req, out).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let (Some(port), Some(path)) = (flag("--port").and_then(|p| p.parse::<u16>().ok()), flag("--out")) else {
        eprintln!("usage: mt-otlp --port PORT --out FILE");
        return ExitCode::from(2);
    };
    let file = match std::fs::OpenOptions::new().create(true).append(true).open(&path) {
        Ok(f) => Arc::new(Mutex::new(f)),
        Err(e) => {
            eprintln!("mt-otlp: {path}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mt-otlp: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve(port, file)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mt-otlp: {e}");
            ExitCode::FAILURE
        }
    }
}
