//! Active health checks: one task per (endpoint address, check), probing
//! at the check's interval shortened by up to 20% at random (and after a
//! random first delay) so checks do not synchronise, while `rise` checks
//! still take at most `rise` intervals. `tcp` passes when a connect succeeds; `http`
//! when `GET path` answers 2xx, both within the timeout. Results go to the
//! endpoint's shared state; a change of healthy state is announced on
//! `changed`, so kernel slot tables follow at once.
#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tracing::info;

use crate::balance::{EndpointState, Registry};
use crate::env::{live, Env};
use crate::model::{CheckKind, HealthCheck, Snapshot, View};

/// The health checks' reader of the state: runs exactly the checks the
/// latest snapshot asks for.
pub struct HealthView {
    checker: Mutex<Checker>,
    registry: Arc<Registry>,
}

impl HealthView {
    /// Must be made inside the runtime the checks run on; health changes
    /// are announced on `changed`.
    pub fn new(registry: Arc<Registry>, changed: mpsc::UnboundedSender<SocketAddr>) -> Self {
        Self { checker: Mutex::new(Checker::new(changed)), registry }
    }

    /// Stops every check.
    pub fn stop(&self) {
        self.checker.lock().unwrap_or_else(|p| p.into_inner()).reconcile(Vec::new());
    }
}

/// Health checks count into no stats row.
impl crate::telemetry::metrics::StatsSource for HealthView {}

impl View for HealthView {
    fn update(&self, snap: &Snapshot) {
        // A write that touched no service with checks changes no check.
        if let Some(d) = &snap.delta {
            let checked = d.before.iter().any(|s| s.health_check.is_some())
                || d.changed.iter().any(|f| snap.state.services[f.service].health_check.is_some());
            if !checked {
                return;
            }
        }
        let mut wanted = Vec::new();
        for f in snap.frontends.iter() {
            let s = &snap.state.services[f.service];
            if let Some(c) = &s.health_check {
                wanted.extend(s.endpoints.iter().map(|e| (self.registry.get(e.addr(f.target_port)), c.clone())));
            }
        }
        self.checker.lock().unwrap_or_else(|p| p.into_inner()).reconcile(wanted);
    }
}

pub struct Checker {
    runtime: tokio::runtime::Handle,
    /// The draws that spread the checks out.
    env: &'static dyn Env,
    changed: mpsc::UnboundedSender<SocketAddr>,
    tasks: HashMap<(SocketAddr, HealthCheck), AbortHandle>,
}

impl Checker {
    /// Must be made inside the runtime the checks run on.
    pub fn new(changed: mpsc::UnboundedSender<SocketAddr>) -> Self {
        Self { runtime: tokio::runtime::Handle::current(), changed, tasks: HashMap::new(), env: live() }
    }

    /// Runs exactly the checks in `wanted`: new ones start, gone ones stop,
    /// unchanged ones keep their rhythm.
    pub fn reconcile(&mut self, wanted: Vec<(Arc<EndpointState>, HealthCheck)>) {
        let keys: HashSet<(SocketAddr, HealthCheck)> = wanted.iter().map(|(e, c)| (e.addr, c.clone())).collect();
        self.tasks.retain(|k, task| {
            let keep = keys.contains(k);
            if !keep {
                task.abort();
            }
            keep
        });
        for (ep, check) in wanted {
            let key = (ep.addr, check.clone());
            if self.tasks.contains_key(&key) {
                continue;
            }
            let changed = self.changed.clone();
            let task = self.runtime.spawn(run(ep, check, changed, self.env));
            self.tasks.insert(key, task.abort_handle());
        }
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        for t in self.tasks.values() {
            t.abort();
        }
    }
}

async fn run(
    ep: Arc<EndpointState>,
    check: HealthCheck,
    changed: mpsc::UnboundedSender<SocketAddr>,
    env: &'static dyn Env,
) {
    tokio::time::sleep(check.interval.mul_f64(env.unit())).await;
    loop {
        let p = probe(ep.addr, &check).await;
        if let Some(rtt) = p.connect_time {
            ep.observe_rtt(rtt, tokio::time::Instant::now());
        }
        let (ok, reason) = (p.passed(), p.seen());
        if ep.record_check(ok, &reason, check.rise, check.fall) {
            info!(endpoint = %ep.addr, healthy = ok, reason, "endpoint health changed");
            let _ = changed.send(ep.addr);
        }
        tokio::time::sleep(check.interval.mul_f64(0.8 + 0.2 * env.unit())).await;
    }
}

/// What a passing check saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passed {
    TcpConnected,
    Http(u16),
}

impl std::fmt::Display for Passed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Passed::TcpConnected => f.write_str("tcp connect ok"),
            Passed::Http(c) => write!(f, "http {c}"),
        }
    }
}

/// Why a check failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckFailed {
    #[error("connect: {0}")]
    Connect(String),
    #[error("http write: {0}")]
    Write(String),
    #[error("http read: {0}")]
    Read(String),
    #[error("http {status} from GET {path}")]
    Status { status: u16, path: String },
    #[error("no HTTP status line from GET {path}: {line:?}")]
    NoStatusLine { path: String, line: String },
    #[error("{kind} check timed out after {after:?}")]
    Timeout { kind: &'static str, after: std::time::Duration },
}

/// One check: what it saw, and the connect time when it connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub result: Result<Passed, CheckFailed>,
    pub connect_time: Option<std::time::Duration>,
}

impl Probe {
    pub fn passed(&self) -> bool {
        self.result.is_ok()
    }

    /// What was seen, as the endpoint's last check reason.
    pub fn seen(&self) -> String {
        match &self.result {
            Ok(p) => p.to_string(),
            Err(e) => e.to_string(),
        }
    }
}

/// One check of `addr`.
pub async fn probe(addr: SocketAddr, check: &HealthCheck) -> Probe {
    let mut connect_time = None;
    let result = match tokio::time::timeout(check.timeout, attempt(addr, &check.kind, &mut connect_time)).await {
        Ok(r) => r,
        Err(_) => Err(CheckFailed::Timeout { kind: kind_name(&check.kind), after: check.timeout }),
    };
    Probe { result, connect_time }
}

fn kind_name(k: &CheckKind) -> &'static str {
    match k {
        CheckKind::Tcp => "tcp",
        CheckKind::Http(_) => "http",
    }
}

async fn attempt(
    addr: SocketAddr,
    kind: &CheckKind,
    connect_time: &mut Option<std::time::Duration>,
) -> Result<Passed, CheckFailed> {
    let t0 = tokio::time::Instant::now();
    let mut s = TcpStream::connect(addr).await.map_err(|e| CheckFailed::Connect(e.to_string()))?;
    *connect_time = Some(t0.elapsed());
    let CheckKind::Http(path) = kind else {
        return Ok(Passed::TcpConnected);
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: mesh-health\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.map_err(|e| CheckFailed::Write(e.to_string()))?;
    let mut buf = vec![0u8; 256];
    let mut got = 0;
    while !buf[..got].contains(&b'\n') && got < buf.len() {
        match s.read(&mut buf[got..]).await {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => return Err(CheckFailed::Read(e.to_string())),
        }
    }
    let line = String::from_utf8_lossy(&buf[..got]);
    let status = line.lines().next().unwrap_or_default().trim().to_owned();
    match status.split_whitespace().nth(1).and_then(|c| c.parse::<u16>().ok()) {
        Some(c) if (200..300).contains(&c) => Ok(Passed::Http(c)),
        Some(c) => Err(CheckFailed::Status { status: c, path: path.clone() }),
        None => Err(CheckFailed::NoStatusLine { path: path.clone(), line: status }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::net::TcpListener;

    fn check(kind: CheckKind) -> HealthCheck {
        HealthCheck { kind, interval: Duration::from_secs(1), timeout: Duration::from_millis(500), rise: 1, fall: 1 }
    }

    /// A server on `ip` answering every request with `status`; with the
    /// Host header each request named, as it named it.
    async fn server(ip: &str, status: &'static str) -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
        let l = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = l.local_addr().unwrap();
        let (hosts, seen) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut b = [0u8; 512];
                let n = s.read(&mut b).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&b[..n]).into_owned();
                if let Some(h) = req.lines().find_map(|l| l.strip_prefix("Host: ")) {
                    let _ = hosts.send(h.to_owned());
                }
                let _ = s.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes()).await;
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn tcp_and_http_checks_on_real_sockets_of_both_families() {
        for ip in ["127.0.0.1", "::1"] {
            checks_on_real_sockets(ip).await;
        }
    }

    async fn checks_on_real_sockets(ip: &str) {
        let (ok, mut hosts) = server(ip, "200 OK").await;
        let (bad, _) = server(ip, "503 Service Unavailable").await;
        let p = probe(ok, &check(CheckKind::Tcp)).await;
        assert!(p.passed() && p.connect_time.is_some(), "a passing tcp check measures the connect time");
        let p = probe(ok, &check(CheckKind::Http("/healthz".into()))).await;
        assert_eq!(p.result, Ok(Passed::Http(200)));
        assert_eq!(p.seen(), "http 200");
        // An IPv6 endpoint is named with brackets: `[::1]:port`.
        assert_eq!(hosts.recv().await.unwrap(), ok.to_string(), "{ip}");
        let p = probe(bad, &check(CheckKind::Http("/healthz".into()))).await;
        assert_eq!(p.result, Err(CheckFailed::Status { status: 503, path: "/healthz".into() }));
        assert_eq!(p.seen(), "http 503 from GET /healthz");
        // A port nobody listens on (bound then closed).
        let closed = std::net::TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap();
        let p = probe(closed, &check(CheckKind::Tcp)).await;
        assert!(matches!(p.result, Err(CheckFailed::Connect(_))) && p.seen().starts_with("connect:"), "{p:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_endpoint_times_out() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        // Accepts (backlog) but never answers the HTTP request.
        let p = probe(a, &check(CheckKind::Http("/".into()))).await;
        assert_eq!(p.seen(), "http check timed out after 500ms");
        assert!(!p.passed());
        drop(l);
    }
}
