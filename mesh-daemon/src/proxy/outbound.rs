//! The outbound listener: connections that connect4 redirected from
//! enrolled pods. Each one is matched to the service the client dialled
//! (recorded by the kernel), sent to an endpoint chosen by the balancer
//! (with retries on other endpoints before the client sees an error), and
//! its bytes copied both ways with half-close kept. An endpoint on another
//! node is reached through the mTLS tunnel as the client's workload
//! identity, unless the service says `mtls: disabled`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::access::Record;
use super::dial::{self, Upstream};
use super::error::ConnectError;
use super::http::{self, upstream::Upstreams};
use super::tries::Tries;
use super::{Route, RouteEndpoint, RouteTable, Workload};
use crate::datapath::OrigDstReader;
use crate::drain::Drain;
use crate::env::Env;
use crate::model::AppProtocol;
use crate::proxy::ProxyCounters;
use crate::relay::{self, Transfer};
use crate::telemetry::otlp::Spans;
use crate::tunnel::client::Pool;

pub struct Outbound {
    /// One socket per family. Set TCP_NODELAY on them: accepted sockets
    /// inherit it, one call fewer per connection.
    pub listener: crate::drain::TcpListeners,
    pub orig: OrigDstReader,
    pub routes: Arc<ArcSwap<RouteTable>>,
    pub counters: Arc<ProxyCounters>,
    /// None: no certificates, so no tunnel.
    pub tunnel: Option<Arc<Pool>>,
    /// Pools of upstream HTTP connections, for request-aware ports.
    pub upstreams: Arc<Upstreams>,
    /// `appProtocol: auto`: how long a client may take to say what it speaks.
    pub detect_timeout: Duration,
    /// Spans of sampled requests.
    pub spans: Arc<Spans>,
    /// A connection that moves no byte either way this long is closed
    /// (`--idle-timeout`).
    pub idle: Duration,
    /// The largest request header block on request ports
    /// (`--max-request-headers`).
    pub max_headers: usize,
    /// The clock and randomness of every decision on this path.
    pub env: &'static dyn Env,
}

impl Outbound {
    /// Accepts until the drain starts; each forwarded connection holds a
    /// drain guard until it closes.
    pub async fn run(self, drain: Drain) {
        let Outbound {
            listener,
            mut orig,
            routes,
            counters,
            tunnel,
            upstreams,
            detect_timeout,
            spans,
            idle,
            max_headers,
            env,
        } = self;
        let guards = drain.clone();
        crate::drain::accept_loop(listener, "outbound", drain, move |client, peer| {
            counters.accepted.inc();
            // A dual-stack listener shows an IPv4 client as IPv4-mapped:
            // it is the IPv4 client (the workloads and the map say so).
            let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
            // Read in the accept loop: it owns the map handle, and the entry
            // must be gone before the client's port can be reused.
            let Some(orig) = orig.take(peer) else {
                counters.no_orig_dst.inc();
                warn!(client = %peer, "connection without a recorded original destination; closed");
                return;
            };
            let table = routes.load();
            let Some(route) = table.route(orig.service_id).cloned() else {
                counters.no_route.inc();
                warn!(client = %peer, service_id = orig.service_id, "original destination is no longer a service; closed");
                return;
            };
            let source = table.workload(peer.ip()).cloned();
            let (counters, tunnel, guard) = (counters.clone(), tunnel.clone(), guards.guard());
            let (upstreams, drain, spans) = (upstreams.clone(), guards.clone(), spans.clone());
            let (routes, service_id) = (routes.clone(), orig.service_id);
            tokio::spawn(async move {
                let proto = match route.app_protocol {
                    AppProtocol::Auto => http::detect::detect(&client, detect_timeout).await,
                    p => p,
                };
                match proto {
                    AppProtocol::Tcp | AppProtocol::Auto => {
                        let guard = routes.load().guard().clone();
                        let tunnel = tunnel.as_deref();
                        let path = Path { counters: &counters, tunnel, idle, env, guard: &guard, client: peer };
                        forward(client, peer, source.as_deref(), &route, path).await
                    }
                    AppProtocol::Http | AppProtocol::Http2 | AppProtocol::Grpc => {
                        counters.forwarded.inc();
                        let at = http::Accepted { routes, service_id, route, source, client: peer, proto, max_headers };
                        let conn = http::Conn::new(at, upstreams, tunnel, counters, spans, idle, env);
                        http::serve(client, Arc::new(conn), drain).await
                    }
                }
                drop(guard);
            });
        })
        .await;
    }
}

/// One connect try to one endpoint. One this node hands the connection
/// to directly (on this node, or without mTLS) is authorized here first;
/// one through the tunnel is authorized by the endpoint's node.
async fn open(
    ep: &RouteEndpoint,
    route: &Route,
    source: Option<&Workload>,
    path: Path<'_>,
) -> Result<Upstream, ConnectError> {
    let id = source.map(|w| &w.identity);
    let via = dial::via(ep, route);
    if via.is_none() {
        let caller = path.guard.caller(id, Some(path.client.ip()));
        path.guard
            .check(&route.key.service, ep.state.addr, &caller, None, route.metrics(), path.env)
            .map_err(|d| ConnectError::Denied { addr: ep.state.addr, by: d.describe() })
            .map(|_| ())?;
    }
    let svc = (&route.key.service, None, Some(path.client.ip()));
    dial::connect(ep.state.addr, via, id, svc, path.tunnel, route.connect_timeout).await
}

/// What a relayed connection's path shares with the others.
#[derive(Clone, Copy)]
struct Path<'a> {
    counters: &'a ProxyCounters,
    tunnel: Option<&'a Pool>,
    idle: Duration,
    env: &'a dyn Env,
    /// The policies, and the client's address they may name.
    guard: &'a crate::proxy::authz::Guard,
    client: SocketAddr,
}

/// Connects to an endpoint of `route`, trying others as [`Tries`] allows.
async fn connect<'r>(
    route: &'r Route,
    source: Option<&Workload>,
    path: Path<'_>,
) -> Result<(Upstream, &'r RouteEndpoint, Duration), ConnectError> {
    let (counters, env) = (path.counters, path.env);
    let mut t0 = env.now();
    let mut tries = Tries::new(route, env, t0);
    let mut last = ConnectError::NoEndpoint;
    while let Some((_, ep)) = tries.pick(t0) {
        match open(ep, route, source, path).await {
            Ok(s) => {
                let now = env.now();
                let rtt = now - t0;
                ep.state.connected(rtt, now);
                ep.series().connect_latency.observe(rtt.as_secs_f64());
                return Ok((s, ep, rtt));
            }
            Err(e) => {
                let again = tries.failed(ep, &e, counters).await;
                last = e;
                if !again {
                    break;
                }
                t0 = env.now();
            }
        }
    }
    Err(last)
}

async fn forward(mut client: TcpStream, peer: SocketAddr, source: Option<&Workload>, route: &Route, path: Path<'_>) {
    let (counters, env) = (path.counters, path.env);
    let src = source.map_or("unknown", |w| w.name.as_str());
    let started = env.now();
    let mut record = Record {
        direction: "outbound",
        source: source.map(|w| w.name.as_str()),
        identity: source.map(|w| &w.identity),
        client: Some(peer),
        service: &route.name,
        endpoint: None,
        node: None,
        bytes_up: None,
        bytes_down: 0,
        duration: Duration::ZERO,
        outcome: "ok",
        error: None,
        request: None,
    };
    if let Some(limiter) = &route.policy.limiter {
        if limiter.admit(source.map(|w| &w.identity), env.secs()).is_err() {
            route.series().rate_limited.inc();
            route.series().failed("rate_limited");
            if limiter.should_log(env.secs() as u64) {
                warn!(client = %peer, source = src, service = %route.name, "over the rate limit: connection refused (logged once a second)");
            }
            // A reset, as a refused connection: the client may try again later.
            let _ = client.set_zero_linger();
            Record { outcome: "rate_limited", duration: started.elapsed(), ..record }.log(route.access_log, env);
            return;
        }
    }
    // Boxed: the connect's state (its tries, the dial) would otherwise be
    // held in this task for as long as the connection is relayed.
    let (upstream, ep, rtt) = match Box::pin(connect(route, source, path)).await {
        Ok(c) => c,
        Err(e) => {
            let outcome = e.reason();
            route.series().failed(outcome);
            if e.counts_against_endpoint() || matches!(e, ConnectError::NoEndpoint) {
                counters.connect_failed.inc();
                warn!(client = %peer, source = src, service = %route.name, error = %e, "no endpoint could be reached; closed");
            } else {
                counters.refused.inc();
                warn!(client = %peer, source = src, service = %route.name, error = %e, outcome, "connection refused; closed, not retried");
            }
            if e.is_denial() {
                // Refused as a connect would be: a reset, no byte through.
                let _ = client.set_zero_linger();
            }
            Record { outcome, error: Some(&e), duration: started.elapsed(), ..record }.log(route.access_log, env);
            return;
        }
    };
    let endpoint = ep.state.addr;
    let series = ep.series();
    series.opened.inc();
    let _in_flight = ep.state.start();
    counters.forwarded.inc();
    counters.active.inc();
    debug!(client = %peer, source = src, service = %route.name, %endpoint, connect_ms = rtt.as_secs_f64() * 1000.0, "forwarding");
    let mut upstream = upstream;
    let Transfer { up, down, error } = relay::relay(&mut client, &mut upstream, path.idle).await;
    counters.active.dec();
    counters.bytes_to_endpoint.inc_by(up);
    counters.bytes_to_client.inc_by(down);
    series.closed.inc();
    series.sent.inc_by(up);
    series.received.inc_by(down);
    let duration = started.elapsed();
    route.series().duration.observe(duration.as_secs_f64());
    if let Some(e) = &error {
        counters.io_errors.inc();
        if e.kind() == std::io::ErrorKind::ConnectionReset && ep.state.failed(env.now(), env.unit()) {
            series.ejections.inc();
        }
    }
    record.endpoint = Some(endpoint);
    record.node = Some(ep.node());
    record.bytes_up = Some(up);
    record.bytes_down = down;
    record.duration = duration;
    record.outcome = relay::outcome(&error);
    record.error = error.as_ref().map(|e| e as &(dyn std::fmt::Display + Sync));
    record.log(route.access_log, env);
}

/// The connect decision in-process, over loopback, with real TLS: a
/// tunnel server for node b and the pool of node a, no root needed.
#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::net::TcpListener;

    use super::*;
    use crate::balance::Registry;
    use crate::env::Live;
    use crate::identity::manager::Certs;
    use crate::identity::{certs::Ca, tls, Identity};
    use crate::model::{parse_document, NodeName, ServiceIds, State};
    use crate::proxy::inbound::Inbound;
    use crate::proxy::{InboundHandler, Local};
    use crate::telemetry::Metrics;
    use crate::tunnel::TunnelCounters;
    use tokio::time::Instant;

    struct Mesh {
        routes: RouteTable,
        source: Arc<Workload>,
        pool: Arc<Pool>,
        counters: ProxyCounters,
        tunnel: Arc<TunnelCounters>,
        /// Cuts the tunnel connections node a holds (see [`forwarder`]).
        cut: Arc<std::sync::atomic::AtomicU64>,
        _dir: TempDir,
        _drain: crate::drain::Drain,
    }

    impl Mesh {
        fn path(&self) -> Path<'_> {
            let guard: &'static crate::proxy::authz::Guard = Box::leak(Box::default());
            let client = "127.0.0.1:1".parse().unwrap();
            Path {
                counters: &self.counters,
                tunnel: Some(&self.pool),
                idle: Duration::from_secs(3600),
                env: &Live,
                guard,
                client,
            }
        }
    }

    /// A TCP forwarder to `to` (node b's tunnel): its port, and a counter
    /// that, once bumped, makes every connection it carried so far close
    /// the moment the client next sends, without passing that on. So node
    /// a holds a pooled connection that looks ready and is gone, as when
    /// node b's daemon went away and its GOAWAY or close has not arrived.
    async fn forwarder(to: SocketAddr) -> (u16, Arc<std::sync::atomic::AtomicU64>) {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let cut = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let gen = cut.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = l.accept().await {
                let born = gen.load(Ordering::SeqCst);
                let gen = gen.clone();
                let server = TcpStream::connect(to).await.unwrap();
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let down = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                });
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n @ 1..) = cr.read(&mut buf).await {
                        if gen.load(Ordering::SeqCst) != born || sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    // Both halves of both sockets go: the client sees the close.
                    down.abort();
                });
            }
        });
        (port, cut)
    }

    struct TempDir(std::path::PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn certs(dir: &std::path::Path, node: &str) -> Arc<Certs> {
        let ca = Ca::from_files(&dir.join("ca.pem"), &dir.join("ca.key")).unwrap();
        let roots = tls::trust_bundle(&dir.join("ca.pem")).unwrap();
        let id = Identity::node("cluster.local", &NodeName::parse(node).unwrap());
        Certs::new("cluster.local", ca, roots, Duration::from_secs(3600), id).unwrap()
    }

    /// Node b (its tunnel on loopback) runs pods 127.0.0.2 (listening on
    /// `port`) and 127.0.0.3 (nothing listens); 127.0.0.5 is nobody's.
    /// The client 127.0.0.10 (sa/client) is on node a.
    async fn mesh(services: &str) -> (Mesh, u16) {
        let dir = std::env::temp_dir().join(format!("mesh-outbound-{}-{}", std::process::id(), fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = Ca::generate("cluster.local", Duration::from_secs(3600)).unwrap();
        std::fs::write(dir.join("ca.pem"), cert).unwrap();
        std::fs::write(dir.join("ca.key"), key).unwrap();
        let pod = TcpListener::bind("127.0.0.2:0").await.unwrap();
        let port = pod.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = pod.accept().await {
                tokio::spawn(async move {
                    let _ = tokio::io::AsyncWriteExt::write_all(&mut s, b"hello from b1").await;
                });
            }
        });
        let tunnel_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (tunnel_port, cut) = forwarder(tunnel_listener.local_addr().unwrap()).await;
        let doc = parse_document(&format!(
            "nodes: [{{name: a, address: 127.0.0.1}}, {{name: b, address: 127.0.0.1}}]\n\
             workloads:\n - {{name: client, serviceAccount: client, node: a, ip: 127.0.0.10, pid: 1}}\n\
             \x20- {{name: b1, serviceAccount: web, node: b, ip: 127.0.0.2, pid: 1}}\n\
             \x20- {{name: b2, serviceAccount: web, node: b, ip: 127.0.0.3, pid: 1}}\n\
             services:\n{}",
            services.replace("PORT", &port.to_string())
        ))
        .unwrap();
        let state = Arc::new(State::from_document(&doc).unwrap());
        let ids = ServiceIds::default().assign(&state.frontend_keys());
        let metrics = Arc::new(Metrics::new());
        let tunnel = Arc::new(TunnelCounters::new(&metrics));
        let view = Inbound::build(&state, &NodeName::parse("b").unwrap(), "cluster.local", &metrics);
        let drain = crate::drain::Drain::new();
        let handler = Arc::new(InboundHandler {
            view: Arc::new(arc_swap::ArcSwap::from_pointee(view)),
            counters: tunnel.clone(),
            drain: drain.clone(),
            spans: Arc::new(crate::telemetry::otlp::Spans::disabled()),
            idle: Duration::from_secs(3600),
            upstreams: Arc::default(),
        });
        let server = certs(&dir, "b");
        let cfg = tls::server_config(server.node_cert(), server.roots.clone()).unwrap();
        tokio::spawn(crate::tunnel::server::serve(
            tunnel_listener,
            tokio_rustls::TlsAcceptor::from(Arc::new(cfg)),
            handler,
            tunnel.clone(),
            crate::tunnel::server::PerPeer::new(crate::tunnel::server::PeerLimits { connections: 8, streams: 64 }),
            drain.clone(),
        ));
        let local = Local { node: NodeName::parse("a").unwrap(), trust_domain: "cluster.local".into(), tunnel_port };
        let routes = RouteTable::build(
            &state,
            &state.frontends(&ids),
            &Registry::default(),
            &Default::default(),
            &local,
            &metrics,
        );
        let source = routes.workload("127.0.0.10".parse().unwrap()).unwrap().clone();
        let m = Mesh {
            routes,
            source,
            pool: Pool::new(certs(&dir, "a")),
            counters: ProxyCounters::new(&metrics),
            tunnel,
            cut,
            _dir: TempDir(dir),
            _drain: drain,
        };
        (m, port)
    }

    async fn read_all(u: Upstream) -> String {
        let mut buf = Vec::new();
        let mut u = u;
        tokio::io::AsyncReadExt::read_to_end(&mut u, &mut buf).await.unwrap();
        String::from_utf8(buf).unwrap()
    }

    #[tokio::test]
    async fn a_refused_connect_is_retried_on_another_endpoint() {
        // 127.0.0.3 is preferred (priority 0) but refuses: node b answers
        // 502, which counts against it, and the retry goes to 127.0.0.2.
        let (m, port) = mesh(
            " - {name: web, vip: 10.96.0.10, ports: [{port: 80, targetPort: PORT}], healthCheck: {protocol: none},\n\
             \x20  endpoints: [{ip: 127.0.0.3, node: b, priority: 0}, {ip: 127.0.0.2, node: b, priority: 1}]}\n",
        )
        .await;
        let route = m.routes.route(1).unwrap();
        let (up, ep, _) = connect(route, Some(&m.source), m.path()).await.unwrap();
        assert_eq!(ep.state.addr, SocketAddr::new("127.0.0.2".parse().unwrap(), port));
        assert_eq!(read_all(up).await, "hello from b1");
        assert_eq!((m.counters.retries.get(), m.tunnel.upstream_failures.get()), (1, 1));
        let refused = &route.endpoints[0];
        assert_eq!(refused.state.view(Instant::now()).breaker, "closed", "one failure of three");
        assert_eq!(m.tunnel.handshakes.get(), 1, "both tries shared one tunnel connection");
    }

    /// A relayed connection's task lives as long as the connection, and
    /// all it holds is its future: while it relays, the relay and the
    /// access-log record, not the connect's state (the tries, a tunnel
    /// dial with its TLS handshake), which is boxed and gone once
    /// connected. At 9 KiB a task, 1000 idle connections held 9 MiB.
    #[tokio::test]
    async fn a_relayed_connection_holds_only_its_relay_while_it_relays() {
        let (m, _) = mesh(
            " - {name: web, vip: 10.96.0.10, ports: [{port: 80, targetPort: 1}], healthCheck: {protocol: none},\n\
             \x20  endpoints: [{ip: 127.0.0.2, node: b}]}\n",
        )
        .await;
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let route = m.routes.route(1).unwrap();
        let relayed = forward(client, "127.0.0.10:1".parse().unwrap(), Some(&m.source), route, m.path());
        let size = std::mem::size_of_val(&relayed);
        assert!(size <= 2048, "a relayed connection's future is {size} bytes");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connects_racing_to_one_node_share_one_tunnel_handshake() {
        let (m, _) = mesh(
            " - {name: web, vip: 10.96.0.10, ports: [{port: 80, targetPort: PORT}], healthCheck: {protocol: none},\n\
             \x20  endpoints: [{ip: 127.0.0.2, node: b}]}\n",
        )
        .await;
        let m = Arc::new(m);
        let racing: Vec<_> = (0..20)
            .map(|_| {
                let m = m.clone();
                tokio::spawn(async move {
                    let route = m.routes.route(1).unwrap();
                    let (up, _, _) = connect(route, Some(&m.source), m.path()).await.unwrap();
                    read_all(up).await
                })
            })
            .collect();
        for r in racing {
            assert_eq!(r.await.unwrap(), "hello from b1");
        }
        assert_eq!(m.tunnel.handshakes.get(), 1, "20 streams, one tunnel connection");
        assert_eq!(m.tunnel.streams.get(), 20);
    }

    #[tokio::test]
    async fn a_stream_on_a_pooled_tunnel_connection_that_went_away_opens_on_a_new_one() {
        let (m, _) = mesh(
            " - {name: web, vip: 10.96.0.10, ports: [{port: 80, targetPort: PORT}], healthCheck: {protocol: none},\n\
             \x20  endpoints: [{ip: 127.0.0.2, node: b}]}\n",
        )
        .await;
        let route = m.routes.route(1).unwrap();
        let (up, _, _) = connect(route, Some(&m.source), m.path()).await.unwrap();
        assert_eq!(read_all(up).await, "hello from b1");
        assert_eq!(m.tunnel.handshakes.get(), 1);
        // The pooled connection is gone, and node a does not know yet: the
        // CONNECT on it fails, and goes once more on a new connection.
        m.cut.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let (up, _, _) = connect(route, Some(&m.source), m.path()).await.unwrap();
        assert_eq!(read_all(up).await, "hello from b1");
        assert_eq!(m.tunnel.handshakes.get(), 2, "a new tunnel connection");
        assert_eq!((m.counters.retries.get(), m.counters.connect_failed.get()), (0, 0), "no endpoint was blamed");
        let ep = &route.endpoints[0];
        assert_eq!(ep.state.view(Instant::now()).breaker, "closed");
    }

    #[tokio::test]
    async fn a_denied_connect_fails_at_once_and_blames_no_endpoint() {
        let (m, _) = mesh(
            " - {name: web, vip: 10.96.0.10, ports: [{port: 80, targetPort: PORT}], healthCheck: {protocol: none},\n\
             \x20  authorization: {identities: [\"spiffe://cluster.local/ns/default/sa/someone-else\"]},\n\
             \x20  endpoints: [{ip: 127.0.0.2, node: b}, {ip: 127.0.0.3, node: b}]}\n",
        )
        .await;
        let route = m.routes.route(1).unwrap();
        for _ in 0..5 {
            let e = connect(route, Some(&m.source), m.path()).await.err().unwrap();
            assert_eq!(e.reason(), "denied", "{e}");
            assert!(e.to_string().contains("refused with 403 Forbidden (policy)"), "{e}");
            assert!(!e.counts_against_endpoint());
        }
        assert_eq!(m.counters.retries.get(), 0, "a refusal is not retried elsewhere");
        assert_eq!(m.tunnel.denied_policy.get(), 5);
        for ep in &route.endpoints {
            assert_eq!(ep.state.view(Instant::now()).breaker, "closed");
        }
    }

    #[tokio::test]
    async fn a_target_that_is_not_a_workload_of_its_node_is_refused_with_403() {
        let (m, _) = mesh(
            " - {name: web, vip: 10.96.0.10, ports: [{port: 80, targetPort: PORT}], healthCheck: {protocol: none},\n\
             \x20  endpoints: [{ip: 127.0.0.5, node: b}]}\n",
        )
        .await;
        let e = connect(m.routes.route(1).unwrap(), Some(&m.source), m.path()).await.err().unwrap();
        assert_eq!(e.reason(), "denied");
        assert!(e.to_string().contains("(not-local)"), "{e}");
        assert_eq!((m.tunnel.denied_not_local.get(), m.tunnel.streams.get()), (1, 0));
    }

    #[tokio::test]
    async fn a_client_without_identity_is_refused_before_the_tunnel() {
        let (m, _) =
            mesh(" - {name: web, vip: 10.96.0.10, ports: [{port: 80, targetPort: PORT}], endpoints: [{ip: 127.0.0.2, node: b}]}\n")
                .await;
        let e = connect(m.routes.route(1).unwrap(), None, m.path()).await.err().unwrap();
        assert_eq!(e.reason(), "no_identity");
        assert_eq!(m.tunnel.handshakes.get(), 0, "nothing was sent to node b");
    }
}
