//! `mesh-daemon run`: restore or seed the state, attach (or take over) the
//! datapath, serve the proxy, the control API and the admin endpoint until
//! SIGTERM/SIGINT.
//!
//! On SIGTERM the datapath stays attached and pinned by default: in-kernel
//! balancing keeps working while no daemon runs (a restart, a rolling
//! update), and the next daemon takes the pinned programs over without a
//! second attach. `--cleanup-on-exit` detaches everything and removes the
//! pins, for uninstalling.
#![forbid(unsafe_code)]

mod args;
mod error;
mod listeners;
pub mod reference;
mod succession;
#[cfg(test)]
mod troubleshooting_tests;
mod views;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tracing::{info, warn};

pub use self::args::{EbpfLogLevel, RunArgs};
pub use self::error::RunError;
use self::listeners::Listeners;
use self::succession::{Predecessor, Signals};
use self::views::AdminView;
use crate::balance::BalanceConfig;
use crate::control::{api, Control, ControlConfig, LiveView, Prepared};
use crate::datapath::{self, Datapath, DatapathConfig, MapsView, OrigDstReader};
use crate::drain::Drain;
use crate::handover::{self, Taken};
use crate::health::HealthView;
use crate::identity::certs::Ca;
use crate::identity::manager::Certs;
use crate::identity::{tls, Identity};
use crate::model::NodeName;
use crate::proxy::ProxyCounters;
use crate::proxy::{InboundHandler, InboundView, Local, Outbound, RoutesView};
use crate::telemetry::logwriter::DroppedLines;
use crate::telemetry::otlp::{SpanCounters, Spans};
use crate::telemetry::{admin, Metrics};
use crate::tunnel::client::Pool;
use crate::tunnel::TunnelCounters;

/// Who owns the state with --kubernetes; the control API says so when it
/// refuses a write.
const MANAGED_BY_KUBERNETES: &str = "Kubernetes discovery (mesh-daemon run --kubernetes)";

/// Runs the daemon until a signal or a handover, then drains and stops.
pub async fn run(args: RunArgs, log_drops: DroppedLines) -> Result<(), RunError> {
    raise_nofile_limit();
    let node = NodeName::parse(&args.node).map_err(|e| RunError::flag("--node", e))?;
    Identity::check_trust_domain(&args.trust_domain).map_err(|e| RunError::flag("--trust-domain", e))?;
    let kube = Kube::connect(&args).await?;
    let telemetry = Telemetry::start(&args, &node, log_drops);
    let certs = certificates(&args, &node).await?;
    if let Some(c) = &certs {
        telemetry.metrics.watch_certificates(Arc::new(views::CertView(Arc::downgrade(c))));
    }
    // A daemon running on this node hands over its listening sockets: it
    // stops writing the maps now, so the state read next is final.
    let handover_path = args.handover_path();
    let mut taken = take_over(&handover_path)?;
    let mut prepared = Control::prepare(control_config(&args, &node, &telemetry.metrics)?, args.config.clone())?;
    let (readers, health_changes) = Readers::subscribe(&mut prepared, &args, &node, &telemetry.metrics);
    let access = Arc::new(api::Access::new(args.api_group.as_deref())?);
    let listeners = Listeners::open(&mut taken, &args, &access, certs.is_some()).await?;
    let copies = listeners.copies()?;
    let dp_cfg = datapath_config(&args, &node)?;
    let (control, orig) = attach(prepared, &dp_cfg, taken.is_some())?;
    log_running(&control, &node, &args);
    telemetry.metrics.serve_live(Arc::new(LiveView(Arc::downgrade(&control))));
    let (drain, exit) = (Drain::new(), Drain::new());
    let units = Units { control: &control, readers: &readers, telemetry: &telemetry, drain: &drain, exit: &exit };
    let serving = units.serve(&args, listeners, certs, orig, access, health_changes, kube)?;
    let mut signals = Signals::install()?;
    // Serving: the daemon before this one may stop accepting now, and the
    // next one can take the listeners from this one.
    succession::serving(taken, &handover_path)?;
    let (handed_tx, mut handed_rx) = unbounded_channel();
    let owner = Predecessor {
        control: control.clone(),
        datapath: dp_cfg.clone(),
        drain: drain.clone(),
        runtime: tokio::runtime::Handle::current(),
        handed_over: handed_tx,
    };
    let successor = succession::offer(&handover_path, copies, owner);
    write_ready_file(&args);
    let handed_over = signals.stop(&mut handed_rx, &drain, &args).await.is_some();
    if let Some(s) = &successor {
        s.close();
    }
    if let Some(f) = &args.ready_file {
        let _ = std::fs::remove_file(f);
    }
    drain.start();
    if handed_over {
        // The new daemon answers the probes and the API from now on.
        exit.start();
    }
    serving.stop(&mut signals, &drain, &exit, &args, handed_over).await;
    readers.health.stop();
    if handed_over {
        // The socket paths and the datapath belong to the new daemon.
        if args.cleanup_on_exit {
            warn!("--cleanup-on-exit is ignored: a new daemon took the datapath over");
        }
        control.shutdown(false);
    } else {
        let _ = std::fs::remove_file(&args.api_socket);
        if successor.is_some() {
            let _ = std::fs::remove_file(&handover_path);
        }
        control.shutdown(args.cleanup_on_exit);
    }
    Ok(())
}

/// What the daemon counts and exports, shared by every unit.
struct Telemetry {
    metrics: Arc<Metrics>,
    tunnel: Arc<TunnelCounters>,
    proxy: Arc<ProxyCounters>,
    spans: Arc<Spans>,
}

impl Telemetry {
    fn start(args: &RunArgs, node: &NodeName, log_drops: DroppedLines) -> Self {
        let metrics = Arc::new(Metrics::new());
        metrics.watch_log_drops(log_drops);
        let tunnel = Arc::new(TunnelCounters::new(&metrics));
        let proxy = Arc::new(ProxyCounters::new(&metrics));
        let counters = SpanCounters::new(&metrics);
        let spans = Arc::new(match &args.otlp_endpoint {
            Some(endpoint) => {
                info!(%endpoint, protocol = ?args.otlp_protocol, "exporting spans of sampled requests over OTLP");
                Spans::start(endpoint.clone(), args.otlp_protocol, node.to_string(), counters)
            }
            None => Spans::disabled(),
        });
        Self { metrics, tunnel, proxy, spans }
    }
}

/// The API server's client with `--kubernetes` (only in builds with the
/// `kubernetes` feature).
struct Kube(#[cfg(feature = "kubernetes")] Option<kube::Client>);

impl Kube {
    async fn connect(args: &RunArgs) -> Result<Self, RunError> {
        #[cfg(feature = "kubernetes")]
        return Ok(Kube(match args.kubernetes {
            true => Some(crate::discovery::watch::connect().await?),
            false => None,
        }));
        #[cfg(not(feature = "kubernetes"))]
        match args.kubernetes {
            true => Err(RunError::flag(
                "--kubernetes",
                "this mesh-daemon was built without Kubernetes discovery; \
                 build it with `cargo build --release -p mesh-cli --features kubernetes` or use the container image",
            )),
            false => Ok(Kube()),
        }
    }
}

/// The certificates of this node and its workloads: from the issuer, from
/// a CA key held here, or none (no tunnel).
async fn certificates(args: &RunArgs, node: &NodeName) -> Result<Option<Arc<Certs>>, RunError> {
    let certs = |flag: &str| {
        let flag = flag.to_owned();
        move |source| RunError::Certificates { flag, source }
    };
    let issuers = (!args.issuer.is_empty()).then(|| args.issuer.clone());
    let id = Identity::node(&args.trust_domain, node);
    Ok(match (&args.ca_cert, &args.ca_key, &args.trust_bundle, issuers, &args.issuer_token) {
        (_, _, Some(bundle), Some(addrs), Some(token)) => {
            let roots = tls::trust_bundle(bundle).map_err(certs("--trust-bundle"))?;
            std::fs::metadata(token)
                .map_err(error::io(format!("--issuer-token {}: cannot read it", token.display())))?;
            let client = crate::identity::issuer::IssuerClient::new(
                addrs.clone(),
                token.clone(),
                roots.clone(),
                args.trust_domain.clone(),
            );
            let addr = addrs.join(", ");
            let certs = Certs::from_issuer(&args.trust_domain, client, roots, args.cert_lifetime, id)
                .await
                .map_err(certs(&format!("--issuer {addr}")))?;
            info!(issuer = %addr, "certificates come from the issuer; this node holds no CA key");
            Some(certs)
        }
        (Some(cert), Some(key), Some(bundle), None, _) => {
            let ca = Ca::from_files(cert, key).map_err(certs("--ca-cert, --ca-key"))?;
            let roots = tls::trust_bundle(bundle).map_err(certs("--trust-bundle"))?;
            Some(Certs::new(&args.trust_domain, ca, roots, args.cert_lifetime, id).map_err(certs("--ca-cert"))?)
        }
        _ => {
            warn!("no --issuer (or --ca-cert/--ca-key) with --trust-bundle: the mTLS tunnel is off, and cross-node endpoints of services with mtls: required are refused");
            None
        }
    })
}

/// The running daemon's listening sockets, if one runs here and hands over.
fn take_over(path: &std::path::Path) -> Result<Option<Taken>, RunError> {
    let taken = handover::take_over(path).map_err(|source| RunError::Handover { path: path.to_owned(), source })?;
    if let Some(t) = &taken {
        info!(
            from_pid = t.from.pid,
            from_version = %t.from.version,
            from_build = %t.from.build,
            build = %handover::build_id(),
            generation = t.generation,
            "taking over from the running daemon"
        );
    }
    Ok(taken)
}

fn control_config(args: &RunArgs, node: &NodeName, metrics: &Arc<Metrics>) -> Result<ControlConfig, RunError> {
    let proxy_listen = args::listen_set(&args.proxy_listen, "--proxy-listen")?;
    Ok(ControlConfig {
        node: node.clone(),
        state_dir: args.state_dir.clone(),
        proxy_listen: proxy_listen.iter().map(|l| l.addr).collect(),
        slot_table_size: args.slot_table_size,
        slot_entries: args.slot_entries,
        balance: BalanceConfig {
            default_rtt: args.default_rtt,
            decay: args.ewma_decay,
            breaker_failures: args.breaker_failures,
            ..BalanceConfig::default()
        },
        metrics: metrics.clone(),
        managed_by: args.kubernetes.then_some(MANAGED_BY_KUBERNETES),
    })
}

/// The readers of every accepted state, each deriving its own view.
struct Readers {
    routes: Arc<RoutesView>,
    inbound: Arc<InboundView>,
    health: Arc<HealthView>,
}

impl Readers {
    /// The readers, subscribed; and the endpoints whose health changed.
    fn subscribe(
        prepared: &mut Prepared,
        args: &RunArgs,
        node: &NodeName,
        metrics: &Arc<Metrics>,
    ) -> (Self, UnboundedReceiver<std::net::SocketAddr>) {
        let (health_tx, health_rx) = unbounded_channel();
        let local =
            Local { node: node.clone(), trust_domain: args.trust_domain.clone(), tunnel_port: args.tunnel_port() };
        let routes = Arc::new(RoutesView::new(prepared.registry(), local, metrics.clone()));
        let inbound = Arc::new(InboundView::new(node.clone(), &args.trust_domain, metrics.clone()));
        let health = Arc::new(HealthView::new(prepared.registry(), health_tx));
        prepared.subscribe(routes.clone());
        prepared.subscribe(inbound.clone());
        prepared.subscribe(health.clone());
        (Self { routes, inbound, health }, health_rx)
    }
}

fn datapath_config(args: &RunArgs, node: &NodeName) -> Result<DatapathConfig, RunError> {
    let cgroup = match &args.cgroup {
        Some(c) => c.clone(),
        None => datapath::cgroup2_root().map_err(error::io("finding the cgroup2 root (or give --cgroup)"))?,
    };
    Ok(DatapathConfig {
        cgroup,
        pin_dir: args.pin_dir.clone().unwrap_or_else(|| PathBuf::from("/sys/fs/bpf/mesh").join(node.as_str())),
        ebpf_log_level: args.ebpf_log_level.to_aya(),
        slot_entries: args.slot_entries,
    })
}

/// Loads (or takes over) the datapath and writes the state to it. On
/// failure a datapath this start attached is removed again; one that was
/// running before (or that the running daemon takes back) is left.
fn attach(prepared: Prepared, cfg: &DatapathConfig, taken: bool) -> Result<(Arc<Control>, OrigDstReader), RunError> {
    let (dp, orig) = Datapath::load(cfg)?;
    let ours = |dp: &Datapath| !dp.reused() && !taken;
    let view = match MapsView::open(&cfg.pin_dir) {
        Ok(v) => v,
        Err(e) => {
            let cleanup = ours(&dp);
            dp.shutdown(cleanup);
            return Err(e.into());
        }
    };
    match prepared.attach(dp, view) {
        Ok(c) => Ok((Arc::new(c), orig)),
        Err(failed) => {
            let (e, dp) = *failed;
            let cleanup = ours(&dp);
            dp.shutdown(cleanup);
            Err(e.into())
        }
    }
}

fn log_running(control: &Control, node: &NodeName, args: &RunArgs) {
    let snap = control.snapshot();
    info!(
        node = %node,
        generation = snap.generation,
        services = snap.state.services.len(),
        workloads = snap.state.workloads.len(),
        api = %args.api_socket.display(),
        admin = %args.admin_listen,
        "mesh-daemon running"
    );
}

fn write_ready_file(args: &RunArgs) {
    if let Some(f) = &args.ready_file {
        if let Err(e) = std::fs::write(f, format!("{}\n", std::process::id())) {
            warn!(file = %f.display(), error = %e, "cannot write --ready-file; the readiness probe fails");
        }
    }
}

/// The addresses of a listener's sockets, for the log: `0.0.0.0:15001 [::]:15001`.
fn listening(l: &crate::drain::TcpListeners) -> String {
    let addrs: Vec<String> = l.sockets.iter().filter_map(|s| s.local_addr().ok()).map(|a| a.to_string()).collect();
    addrs.join(" ")
}

/// What every serving unit is started with.
struct Units<'a> {
    control: &'a Arc<Control>,
    readers: &'a Readers,
    telemetry: &'a Telemetry,
    /// Stops the listeners that take traffic.
    drain: &'a Drain,
    /// Stops the admin endpoint, once the drain is over.
    exit: &'a Drain,
}

/// The serving tasks.
struct Serving {
    proxy: tokio::task::JoinHandle<()>,
    api: tokio::task::JoinHandle<()>,
    admin: tokio::task::JoinHandle<()>,
    /// Aborted at the end: the tunnel server, renewals, discovery, the
    /// health re-sync.
    background: Vec<tokio::task::JoinHandle<()>>,
}

impl Units<'_> {
    #[allow(clippy::too_many_arguments)]
    fn serve(
        &self,
        args: &RunArgs,
        listeners: Listeners,
        certs: Option<Arc<Certs>>,
        orig: OrigDstReader,
        access: Arc<api::Access>,
        health_changes: UnboundedReceiver<std::net::SocketAddr>,
        kube: Kube,
    ) -> Result<Serving, RunError> {
        let (t, drain) = (self.telemetry, self.drain);
        let mut background = Vec::new();
        let pool = match (certs, listeners.tunnel) {
            (Some(certs), Some(l)) => Some(self.tunnel(args, certs, l, &mut background)?),
            _ => None,
        };
        #[cfg(feature = "kubernetes")]
        if let Some(client) = kube.0 {
            let (c, stop) = (self.control.clone(), drain.clone());
            background.push(tokio::spawn(async move {
                if let Err(e) = crate::discovery::watch::run(client, c, PathBuf::from("/proc"), stop).await {
                    tracing::error!(error = %e, "Kubernetes discovery stopped; the state stays as it was");
                }
            }));
        }
        #[cfg(not(feature = "kubernetes"))]
        let _ = kube;
        info!(outbound = listening(&listeners.outbound), "proxy listening");
        let outbound = Outbound {
            spans: t.spans.clone(),
            listener: listeners.outbound,
            orig,
            routes: self.readers.routes.table(),
            counters: t.proxy.clone(),
            tunnel: pool,
            upstreams: self.readers.routes.upstreams(),
            detect_timeout: args.protocol_detect_timeout,
            idle: args.idle_timeout,
            max_headers: args.max_request_headers as usize,
            env: crate::env::live(),
        };
        let proxy = tokio::spawn(outbound.run(drain.clone()));
        let view =
            Arc::new(AdminView { control: self.control.clone(), counters: t.proxy.clone(), tunnel: t.tunnel.clone() });
        let timeout = args.client_header_timeout;
        if let Some(l) = listeners.metrics {
            let paths = admin::Paths::MetricsOnly;
            background.push(tokio::spawn(admin::serve(l, view.clone(), paths, timeout, self.exit.clone())));
        }
        let admin = tokio::spawn(admin::serve(listeners.admin, view, admin::Paths::All, timeout, self.exit.clone()));
        let api = tokio::spawn(api::serve(listeners.api, self.control.clone(), access, timeout, drain.clone()));
        background.push(tokio::spawn(resync_health(self.control.clone(), health_changes)));
        Ok(Serving { proxy, api, admin, background })
    }

    /// The mTLS tunnel's server and certificate renewal; the client pool.
    fn tunnel(
        &self,
        args: &RunArgs,
        certs: Arc<Certs>,
        listener: crate::drain::TcpListeners,
        tasks: &mut Vec<tokio::task::JoinHandle<()>>,
    ) -> Result<Arc<Pool>, RunError> {
        let t = self.telemetry;
        let at = listening(&listener);
        let cfg = tls::server_config(certs.node_cert(), certs.roots.clone())?;
        let handler = Arc::new(InboundHandler {
            view: self.readers.inbound.view(),
            counters: t.tunnel.clone(),
            drain: self.drain.clone(),
            spans: t.spans.clone(),
            idle: args.idle_timeout,
            upstreams: self.readers.routes.upstreams(),
        });
        let limits = crate::tunnel::server::PeerLimits {
            connections: args.tunnel_connections_per_peer,
            streams: args.tunnel_streams_per_peer,
        };
        tasks.push(tokio::spawn(crate::tunnel::server::serve(
            listener,
            tokio_rustls::TlsAcceptor::from(Arc::new(cfg)),
            handler,
            t.tunnel.clone(),
            crate::tunnel::server::PerPeer::new(limits),
            self.drain.clone(),
        )));
        tasks.push(tokio::spawn(certs.clone().renew_loop()));
        info!(tunnel = at, identity = %certs.node_id(), "mTLS tunnel listening");
        Ok(Pool::new(certs))
    }
}

impl Serving {
    /// After the drain started: waits for the proxy and the API to stop,
    /// for the drain, then stops the admin endpoint and the rest.
    async fn stop(self, signals: &mut Signals, drain: &Drain, exit: &Drain, args: &RunArgs, handed_over: bool) {
        let _ = tokio::join!(self.proxy, self.api);
        signals.drain(drain, args.drain_timeout, handed_over).await;
        exit.start();
        let _ = self.admin.await;
        info!(cleanup = args.cleanup_on_exit, "shutting down");
        for t in self.background {
            t.abort();
        }
    }
}

/// Health changes reach the kernel slot tables at once (batched).
async fn resync_health(control: Arc<Control>, mut changes: UnboundedReceiver<std::net::SocketAddr>) {
    while let Some(first) = changes.recv().await {
        let mut changed = vec![first];
        while let Ok(a) = changes.try_recv() {
            changed.push(a);
        }
        let c = control.clone();
        let _ = tokio::task::spawn_blocking(move || c.resync(&changed)).await;
    }
}

/// Every proxied connection takes two descriptors: lift the soft limit on
/// open files to the hard one, as proxies do.
fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => info!(from = soft, to = hard, "raised the open-files limit"),
            Err(e) => warn!(error = %e, soft, "cannot raise the open-files limit"),
        },
        Ok(_) => {}
        Err(e) => warn!(error = %e, "cannot read the open-files limit"),
    }
}

/// `mesh-daemon probe`: see its help.
pub fn probe(ready_file: &std::path::Path, admin: SocketAddr) -> Result<(), RunError> {
    use std::io::{Read, Write};
    let pid = std::fs::read_to_string(ready_file)
        .map_err(error::io(format!("{}: this container's daemon does not serve (yet)", ready_file.display())))?;
    let mut s = std::net::TcpStream::connect_timeout(&admin, std::time::Duration::from_secs(2))
        .map_err(error::io(format!("{admin}: the admin endpoint does not answer")))?;
    let asking = || error::io(format!("{admin}/ready"));
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).map_err(asking())?;
    s.write_all(b"GET /ready HTTP/1.0\r\nHost: localhost\r\n\r\n").map_err(asking())?;
    let mut answer = String::new();
    s.take(64 * 1024).read_to_string(&mut answer).map_err(asking())?;
    let status = answer.split_whitespace().nth(1).unwrap_or("none");
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("").trim();
    if status != "200" {
        return Err(RunError::NotReady(format!("{admin}/ready answered {status}: {body}")));
    }
    println!("ready (pid {})", pid.trim());
    Ok(())
}
