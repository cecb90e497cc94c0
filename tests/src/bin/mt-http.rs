//! An HTTP backend for the request-aware tests: HTTP/1.1 and HTTP/2 with
//! prior knowledge (h2c) on one port, each answer `backend=NAME`.
//!
//! usage: mt-http --name NAME --port PORT [--delay-ms MS] [--fail-percent P] [--status S] [--max-requests N]
//! `GET /__count` answers `served=N`: the requests it answered so far. A
//! request with `Upgrade: echo` is answered 101 and the connection then
//! echoes its bytes. `/status/NNN` answers with status NNN; `/delay/MS`
//! answers after MS milliseconds. A request with `x-echo-request` gets
//! its path (`path=/p?q`) and its `x-header-*`, `mesh-*` and
//! `x-forwarded-client-cert` headers (`NAME=VALUE`)
//! back. A request body
//! is read whole and its length answered as a `received=N` line.
//! Trace headers it received (`traceparent`, `b3`, `x-b3-spanid`) come back
//! as `NAME=VALUE` lines.
//! `--fail-percent P` answers 503 to P% of requests at random, `--status S`
//! answers S to every request. `GET /__cancelled` answers `cancelled=N`:
//! requests whose client (the proxy) went away before the answer;
//! `GET /__connections` answers `connections=N`: the connections it
//! accepted so far (this one too). `--max-requests N` ends each connection
//! gracefully after N requests.
//!
//! usage: mt-http --follow ADDR (--h1 | --h2)
//! A client that opens one connection to ADDR (HTTP/1.1 keep-alive or
//! HTTP/2 with prior knowledge) and keeps it for its whole life. For each
//! line `N PATH [METHOD [CxB]]` on stdin it sends N requests (GET unless
//! a METHOD is given; with C headers of B bytes each) for PATH over that
//! connection, one after another, and prints one line: how many each
//! backend answered and every status, `web-1=12 web-2=8 504=3`; the
//! line `ok` once the connection is up. It exits at the end of stdin, or
//! when the connection fails (`error: ...`).

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
/// Connections accepted.
static CONNECTIONS: AtomicU64 = AtomicU64::new(0);

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
    /// Each connection ends gracefully after this many requests (as
    /// nginx's `keepalive_requests` and `http2_max_requests`).
    max_requests: Option<u64>,
}

fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map(String::as_str)
}

async fn serve(name: String, port: u16, how: Behaviour) -> std::io::Result<()> {
    // [::] takes both families; 0.0.0.0 where the pod has no IPv6.
    let l = match tokio::net::TcpListener::bind(("::", port)).await {
        Ok(l) => l,
        Err(_) => tokio::net::TcpListener::bind(("0.0.0.0", port)).await?,
    };
    eprintln!("mt-http: {name} serving on {port}");
    let body: Bytes = format!("backend={name}\n").into();
    loop {
        let (s, _) = l.accept().await?;
        CONNECTIONS.fetch_add(1, Ordering::Relaxed);
        let _ = s.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let (here, last) =
                (std::sync::Arc::new(AtomicU64::new(0)), std::sync::Arc::new(tokio::sync::Notify::new()));
            let (here_svc, last_svc) = (here.clone(), last.clone());
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let body = body.clone();
                if how.max_requests.is_some_and(|max| here_svc.fetch_add(1, Ordering::Relaxed) + 1 >= max) {
                    // Ends the connection once this answer is written.
                    last_svc.notify_one();
                }
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
                    let counters = [
                        ("/__count", "served", &SERVED),
                        ("/__cancelled", "cancelled", &CANCELLED),
                        ("/__connections", "connections", &CONNECTIONS),
                    ];
                    if let Some((_, what, n)) = counters.iter().find(|(path, ..)| req.uri().path() == *path) {
                        let n = n.load(Ordering::Relaxed);
                        return Ok(Response::new(Full::new(Bytes::from(format!("{what}={n}\n")))));
                    }
                    SERVED.fetch_add(1, Ordering::Relaxed);
                    let mut pending = Pending(false);
                    let delay = req
                        .uri()
                        .path()
                        .strip_prefix("/delay/")
                        .and_then(|ms| ms.parse().ok())
                        .map_or(how.delay, Duration::from_millis);
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    pending.0 = true;
                    let status = req
                        .uri()
                        .path()
                        .strip_prefix("/status/")
                        .and_then(|s| s.parse::<u16>().ok())
                        .and_then(|s| hyper::StatusCode::from_u16(s).ok());
                    let mut extra = String::new();
                    if req.headers().contains_key("x-echo-request") {
                        // What the proxy sent on: the path and the x-header-* headers.
                        extra.push_str(&format!("path={}\n", req.uri().path_and_query().map_or("/", |p| p.as_str())));
                        for (n, v) in req.headers() {
                            if n.as_str().starts_with("x-header-")
                                || n.as_str().starts_with("mesh-")
                                || n == "x-forwarded-client-cert"
                            {
                                extra.push_str(&format!("{n}={}\n", v.to_str().unwrap_or("?")));
                            }
                        }
                    }
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
            // Larger header blocks than hyper's defaults (16 KiB on
            // HTTP/2): the proxy's limit is what the tests look at.
            let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            b.http1().max_buf_size(1 << 20);
            b.http2().max_header_list_size(1 << 20);
            let conn = b.serve_connection_with_upgrades(TokioIo::new(s), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = last.notified() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

/// One request on `send`; who answered (`backend=NAME`) or the status.
async fn one(send: &mut Sender, addr: &str, path: &str, method: &str, extra: &str) -> Result<String, String> {
    let mut b = Request::builder().method(method).uri(format!("http://{addr}{path}"));
    // `CxN`: C headers of N bytes each (`x-pad-I`).
    if let Some((c, n)) =
        extra.split_once('x').and_then(|(c, n)| Some((c.parse::<usize>().ok()?, n.parse::<usize>().ok()?)))
    {
        for i in 0..c {
            b = b.header(format!("x-pad-{i}"), "p".repeat(n));
        }
    }
    let req = b.header("host", addr).body(http_body_util::Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
    let resp = match send {
        Sender::H1(s) => {
            s.ready().await.map_err(|e| e.to_string())?;
            s.send_request(req).await
        }
        Sender::H2(s) => {
            s.ready().await.map_err(|e| e.to_string())?;
            s.send_request(req).await
        }
    }
    .map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    let text = String::from_utf8_lossy(&body);
    Ok(match text.lines().find_map(|l| l.strip_prefix("backend=")) {
        Some(name) if status.is_success() => name.to_owned(),
        _ => status.as_u16().to_string(),
    })
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<http_body_util::Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>>),
}

/// The `--follow` client (see the top of the file).
async fn follow(addr: String, h2: bool) -> Result<(), String> {
    use tokio::io::AsyncBufReadExt;
    let s = tokio::net::TcpStream::connect(&addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = s.set_nodelay(true);
    let io = TokioIo::new(s);
    let mut send = if h2 {
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Sender::H2(send)
    } else {
        let (send, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Sender::H1(send)
    };
    println!("ok");
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await.map_err(|e| e.to_string())? {
        let mut words = line.split_whitespace();
        let (Some(n), path) = (words.next().and_then(|n| n.parse::<u32>().ok()), words.next().unwrap_or("/")) else {
            return Err(format!("not `N PATH [METHOD]`: {line:?}"));
        };
        let method = words.next().unwrap_or("GET");
        let extra = words.next().unwrap_or("");
        let mut tally = std::collections::BTreeMap::new();
        for _ in 0..n {
            let got = match one(&mut send, &addr, path, method, extra).await {
                Ok(got) => got,
                // A request the proxy refused by closing the connection.
                Err(e) if !extra.is_empty() => format!("error:{}", e.split_whitespace().next().unwrap_or("?")),
                Err(e) => return Err(e),
            };
            *tally.entry(got).or_insert(0u32) += 1;
        }
        let words: Vec<String> = tally.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("{}", words.join(" "));
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(addr) = flag(&args, "--follow") {
        let h2 = args.iter().any(|a| a == "--h2");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build();
        return match rt.map_err(|e| e.to_string()).and_then(|rt| rt.block_on(follow(addr.to_owned(), h2))) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                println!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let (Some(name), Some(port)) = (flag(&args, "--name"), flag(&args, "--port").and_then(|p| p.parse().ok())) else {
        eprintln!(
            "usage: mt-http --name NAME --port PORT [--delay-ms MS] [--fail-percent P] [--status S] [--max-requests N]"
        );
        return ExitCode::from(2);
    };
    let how = Behaviour {
        delay: Duration::from_millis(flag(&args, "--delay-ms").and_then(|d| d.parse().ok()).unwrap_or(0)),
        fail_percent: flag(&args, "--fail-percent").and_then(|d| d.parse().ok()).unwrap_or(0),
        status: flag(&args, "--status").and_then(|s| s.parse().ok()).and_then(|s| hyper::StatusCode::from_u16(s).ok()),
        max_requests: flag(&args, "--max-requests").and_then(|n| n.parse().ok()),
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
