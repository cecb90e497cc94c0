//! An HTTP backend for the request-aware tests: HTTP/1.1 and HTTP/2 with
//! prior knowledge (h2c) on one port, each answer `backend=NAME`.
//!
//! usage: mt-http --name NAME --port PORT [--delay-ms MS] [--fail-percent P] [--status S]
//! `GET /__count` answers `served=N`: the requests it answered so far. A
//! request with `Upgrade: echo` is answered 101 and the connection then
//! echoes its bytes. `/status/NNN` answers with status NNN. A request body
//! is read whole and its length answered as a `received=N` line.
//! Trace headers it received (`traceparent`, `b3`, `x-b3-spanid`) come back
//! as `NAME=VALUE` lines.
//! `--fail-percent P` answers 503 to P% of requests at random, `--status S`
//! answers S to every request. `GET /__cancelled` answers `cancelled=N`:
//! requests whose client (the proxy) went away before the answer.

use std::convert::Infallible;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// Requests answered, but for `/__count` itself.
static SERVED: AtomicU64 = AtomicU64::new(0);
/// Requests dropped before their answer was ready.
static CANCELLED: AtomicU64 = AtomicU64::new(0);

/// Counts a request as cancelled if dropped before `done`.
struct Pending(bool);

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.0 {
            CANCELLED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// How this backend answers.
#[derive(Clone, Copy)]
struct Behaviour {
    delay: Duration,
    fail_percent: u32,
    status: Option<hyper::StatusCode>,
}

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map(String::as_str)
}

async fn serve(name: String, port: u16, how: Behaviour) -> std::io::Result<()> {
    let l = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
    eprintln!("mt-http: {name} serving on {port}");
    let body: Bytes = format!("backend={name}\n").into();
    loop {
        let (s, _) = l.accept().await?;
        let _ = s.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let body = body.clone();
                async move {
                    if req.headers().get("upgrade").is_some_and(|v| v == "echo") {
                        // Leave HTTP: echo whatever arrives on the connection.
                        let mut req = req;
                        tokio::spawn(async move {
                            if let Ok(up) = hyper::upgrade::on(&mut req).await {
                                let mut io = TokioIo::new(up);
                                let (mut r, mut w) = tokio::io::split(&mut io);
                                let _ = tokio::io::copy(&mut r, &mut w).await;
                            }
                        });
                        let mut resp = Response::new(Full::new(Bytes::new()));
                        *resp.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
                        resp.headers_mut().insert("connection", "upgrade".parse().unwrap());
                        resp.headers_mut().insert("upgrade", "echo".parse().unwrap());
                        return Ok::<_, Infallible>(resp);
                    }
                    if req.uri().path() == "/__count" {
                        let n = SERVED.load(Ordering::Relaxed);
                        return Ok(Response::new(Full::new(Bytes::from(format!("served={n}\n")))));
                    }
                    if req.uri().path() == "/__cancelled" {
                        let n = CANCELLED.load(Ordering::Relaxed);
                        return Ok(Response::new(Full::new(Bytes::from(format!("cancelled={n}\n")))));
                    }
                    SERVED.fetch_add(1, Ordering::Relaxed);
                    let mut pending = Pending(false);
                    if !how.delay.is_zero() {
                        tokio::time::sleep(how.delay).await;
                    }
                    pending.0 = true;
                    let status = req
                        .uri()
                        .path()
                        .strip_prefix("/status/")
                        .and_then(|s| s.parse::<u16>().ok())
                        .and_then(|s| hyper::StatusCode::from_u16(s).ok());
                    let mut extra = String::new();
                    for h in ["traceparent", "b3", "x-b3-spanid"] {
                        if let Some(v) = req.headers().get(h).and_then(|v| v.to_str().ok()) {
                            extra.push_str(&format!("{h}={v}\n"));
                        }
                    }
                    let received = req.into_body().collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
                    if received > 0 {
                        extra.push_str(&format!("received={received}\n"));
                    }
                    let body = if extra.is_empty() {
                        body
                    } else {
                        let mut b = body.to_vec();
                        b.extend_from_slice(extra.as_bytes());
                        Bytes::from(b)
                    };
                    let mut resp = Response::new(Full::new(body));
                    let failed = how.fail_percent > 0 && fastrand::u32(0..100) < how.fail_percent;
                    if let Some(s) = status.or(how.status) {
                        *resp.status_mut() = s;
                    } else if failed {
                        *resp.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    Ok(resp)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(s), svc)
                .await;
        });
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(name), Some(port)) = (flag(&args, "--name"), flag(&args, "--port").and_then(|p| p.parse().ok())) else {
        eprintln!("usage: mt-http --name NAME --port PORT [--delay-ms MS] [--fail-percent P] [--status S]");
        return ExitCode::from(2);
    };
    let how = Behaviour {
        delay: Duration::from_millis(flag(&args, "--delay-ms").and_then(|d| d.parse().ok()).unwrap_or(0)),
        fail_percent: flag(&args, "--fail-percent").and_then(|d| d.parse().ok()).unwrap_or(0),
        status: flag(&args, "--status").and_then(|s| s.parse().ok()).and_then(|s| hyper::StatusCode::from_u16(s).ok()),
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mt-http: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve(name.to_owned(), port, how)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mt-http: {e}");
            ExitCode::FAILURE
        }
    }
}
