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

use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::balance::BalanceConfig;
use crate::control::{api, Control, ControlConfig, LiveView};
use crate::datapath::{self, Datapath, DatapathConfig, MapsView};
use crate::drain::Drain;
use crate::handover::{self, Taken};
use crate::health::HealthView;
use crate::identity::certs::Ca;
use crate::identity::manager::Certs;
use crate::identity::tls;
use crate::model::{Invalid, NodeName};
use crate::proxy::{InboundHandler, InboundView, Local, Outbound, RoutesView};
use crate::telemetry::otlp::Spans;
use crate::telemetry::Metrics;
use crate::telemetry::{admin, ProxyCounters};
use crate::tunnel::client::Pool;
use crate::tunnel::TunnelCounters;

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Seeds the state when none is saved in --state-dir (YAML or JSON).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Which node this daemon runs on.
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    pub node: String,
    /// Where the accepted state is saved and restored from.
    #[arg(long, default_value = "/var/lib/mesh", value_name = "DIR")]
    pub state_dir: PathBuf,
    /// The control API's Unix socket.
    #[arg(long, default_value = "/run/mesh/mesh.sock", value_name = "PATH")]
    pub api_socket: PathBuf,
    /// Group whose members may use the control API (besides root).
    #[arg(long, value_name = "GROUP")]
    pub api_group: Option<String>,
    /// cgroup2 directory to attach the programs to [default: the cgroup2 root,
    /// from /proc/self/mountinfo].
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// Where maps and links are pinned [default: /sys/fs/bpf/mesh/<node>].
    #[arg(long, value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,
    /// Outbound listener, the target of redirected connections. With an
    /// unspecified IP, pods are sent to the node's address from the state.
    #[arg(long, default_value = "0.0.0.0:15001", value_name = "ADDR")]
    pub proxy_listen: SocketAddrV4,
    /// Admin HTTP endpoint (/live, /ready, /stats).
    #[arg(long, default_value = "127.0.0.1:15020", value_name = "ADDR")]
    pub admin_listen: SocketAddr,
    /// The most slots a kernel-mode service table gets (1 to 4096): tables
    /// are as small as their weights allow, up to this.
    #[arg(long, default_value_t = 256, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub slot_table_size: u32,
    /// Entries of the kernel's slot map, shared by every kernel-mode table
    /// (kernel memory is taken per entry in use, about 120 bytes each).
    /// Taken when the map is created; a map pinned by an earlier daemon
    /// keeps its size.
    #[arg(long, default_value_t = mesh_common::limits::MAX_SLOTS, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=16_777_216))]
    pub slot_entries: u32,
    /// Time constant of the peak-EWMA of connect time (e.g. 10s).
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = duration)]
    pub ewma_decay: std::time::Duration,
    /// Connect time assumed for an endpoint not measured yet.
    #[arg(long, default_value = "30ms", value_name = "DURATION", value_parser = duration)]
    pub default_rtt: std::time::Duration,
    /// Consecutive connect failures or resets that eject an endpoint.
    #[arg(long, default_value_t = 3, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100))]
    pub breaker_failures: u32,
    /// Worker threads of the proxy's runtime (0: one per CPU).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub worker_threads: usize,
    /// Trust domain of the SPIFFE identities.
    #[arg(long, default_value = "cluster.local", value_name = "DOMAIN")]
    pub trust_domain: String,
    /// PEM CA certificates that tunnel peers must chain to.
    #[arg(long, value_name = "FILE")]
    pub trust_bundle: Option<PathBuf>,
    /// The issuer (`mesh-daemon ca serve`) this daemon gets its node's and
    /// its workloads' certificates from, by CSR; no CA key on the node.
    /// Its certificate must chain to --trust-bundle. Repeat it for
    /// replicas: one that cannot be reached is passed over.
    #[arg(
        long,
        value_name = "HOST:PORT",
        value_parser = crate::identity::issuer::host_port,
        requires_all = ["issuer_token", "trust_bundle"],
        conflicts_with = "ca_key"
    )]
    pub issuer: Vec<String>,
    /// This node's credential for the issuer, read at every request: a
    /// token from `mesh-daemon ca bootstrap`, or in Kubernetes the daemon's
    /// projected service-account token (audience mesh-issuer).
    #[arg(long, value_name = "FILE", requires = "issuer")]
    pub issuer_token: Option<PathBuf>,
    /// CA certificate (PEM) this daemon issues node and workload
    /// certificates from, holding the CA key itself: for development on
    /// one machine; clusters use --issuer.
    #[arg(long, value_name = "FILE", requires_all = ["ca_key", "trust_bundle"])]
    pub ca_cert: Option<PathBuf>,
    /// The CA's private key (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["ca_cert", "trust_bundle"])]
    pub ca_key: Option<PathBuf>,
    /// Lifetime of issued certificates; renewed at 70% of it.
    #[arg(long, default_value = "24h", value_name = "DURATION", value_parser = long_duration)]
    pub cert_lifetime: std::time::Duration,
    /// The mTLS tunnel listener (HTTP/2 CONNECT); every node uses the same port.
    #[arg(long, default_value = "0.0.0.0:15008", value_name = "ADDR")]
    pub tunnel_listen: SocketAddrV4,
    /// On SIGTERM, how long open proxied connections and tunnel streams
    /// may take to finish before the daemon exits anyway. Keep the pod's
    /// terminationGracePeriodSeconds above it.
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = duration)]
    pub drain_timeout: std::time::Duration,
    /// A relayed connection or tunnel stream that moves no byte either way
    /// for this long is closed (both ends), so an idle client cannot hold
    /// a backend connection forever; an HTTP/2 client connection on the
    /// request path gets a GOAWAY and is closed.
    #[arg(long, default_value = "1h", value_name = "DURATION", value_parser = long_duration)]
    pub idle_timeout: std::time::Duration,
    /// Tunnel connections one peer identity (a node or a workload) may
    /// hold open to this node; more are closed after the handshake.
    #[arg(long, default_value_t = 64, value_name = "N", value_parser = clap::builder::TypedValueParser::map(clap::value_parser!(u32).range(1..), |n| n as usize))]
    pub tunnel_connections_per_peer: usize,
    /// Tunnel streams one peer identity may hold open on this node, over
    /// all its connections (each carries up to 1024); more are refused
    /// (503, `mesh-deny: peer_stream_limit`).
    #[arg(long, default_value_t = 16384, value_name = "N", value_parser = clap::builder::TypedValueParser::map(clap::value_parser!(u32).range(1..), |n| n as usize))]
    pub tunnel_streams_per_peer: usize,
    /// The control API and the admin endpoint: how long a client may take
    /// to send a request's headers (and, for the API, its body) before
    /// its connection is closed.
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = duration)]
    pub client_header_timeout: std::time::Duration,
    /// `appProtocol: auto` ports: how long a client may take to send its
    /// first bytes before the connection is treated as opaque TCP.
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = duration)]
    pub protocol_detect_timeout: std::time::Duration,
    /// Export spans of sampled requests (those arriving with a sampled W3C
    /// or B3 trace context) to this OTLP collector, e.g.
    /// `http://otel-collector.observability:4318`. Without it the proxy
    /// records no spans and passes trace headers on unchanged.
    #[arg(long, value_name = "URL", value_parser = otlp_endpoint)]
    pub otlp_endpoint: Option<hyper::Uri>,
    /// How spans reach the collector: http/protobuf (port 4318) or grpc
    /// (port 4317, HTTP/2 without TLS).
    #[arg(long, default_value = "http/protobuf", value_name = "PROTOCOL")]
    pub otlp_protocol: crate::telemetry::otlp::OtlpProtocol,
    /// Where this daemon hands its listening sockets to the next one (a
    /// restart or upgrade without a refused connection), and where a new
    /// daemon asks the running one for them [default:
    /// <state-dir>/handover.sock].
    #[arg(long, value_name = "PATH")]
    pub handover_socket: Option<PathBuf>,
    /// A file this daemon writes (its pid) once it serves and removes when
    /// it drains: `mesh-daemon probe` reads it, so a new pod is not taken
    /// for ready while the old pod's daemon still answers on the admin
    /// port they share (hostNetwork).
    #[arg(long, value_name = "FILE")]
    pub ready_file: Option<PathBuf>,
    /// On exit, detach the programs and remove every pin (uninstall).
    /// Without it the datapath keeps working until the next daemon.
    #[arg(long)]
    pub cleanup_on_exit: bool,
    /// Highest level the kernel programs log at: off, error, warn, info,
    /// debug, trace.
    #[arg(long, default_value = "warn", value_name = "LEVEL")]
    pub ebpf_log_level: EbpfLogLevel,
    /// Follow the Kubernetes API server: Services, EndpointSlices, Pods and
    /// Namespaces become the state, and the control API only reads. In a
    /// pod it uses the pod's service account, elsewhere KUBECONFIG. Needs
    /// a build with the `kubernetes` feature (the container image has it).
    #[arg(long, conflicts_with = "config")]
    pub kubernetes: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum EbpfLogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl EbpfLogLevel {
    fn to_aya(self) -> Option<aya_log::Level> {
        Some(match self {
            EbpfLogLevel::Off => return None,
            EbpfLogLevel::Error => aya_log::Level::Error,
            EbpfLogLevel::Warn => aya_log::Level::Warn,
            EbpfLogLevel::Info => aya_log::Level::Info,
            EbpfLogLevel::Debug => aya_log::Level::Debug,
            EbpfLogLevel::Trace => aya_log::Level::Trace,
        })
    }
}

fn duration(s: &str) -> Result<std::time::Duration, Invalid> {
    crate::model::parse_duration(s)
}

/// An OTLP collector's base URL: `http://host:port`.
fn otlp_endpoint(s: &str) -> Result<hyper::Uri, Invalid> {
    let u: hyper::Uri = s.parse().map_err(|e| Invalid(format!("{s:?} is not a URL: {e}")))?;
    match (u.scheme_str(), u.authority()) {
        (Some("http"), Some(_)) => Ok(u),
        (Some("https"), _) => Err(Invalid(format!(
            "{s}: TLS to the collector is not supported yet; use http:// (a node-local collector or agent)"
        ))),
        _ => Err(Invalid(format!("{s:?}: give http://host:port"))),
    }
}

/// Like [`duration`], also taking hours (`24h`).
fn long_duration(s: &str) -> Result<std::time::Duration, Invalid> {
    match s.strip_suffix('h').and_then(|h| h.parse::<u64>().ok()) {
        Some(h) => Ok(std::time::Duration::from_secs(h * 3600)),
        None => crate::model::parse_duration(s),
    }
}

/// Names of the listening sockets in a handover.
const OUTBOUND: &str = "outbound";
const TUNNEL: &str = "tunnel";
const ADMIN: &str = "admin";
const API: &str = "api";

/// Who owns the state with --kubernetes; the control API says so when it
/// refuses a write.
const MANAGED_BY_KUBERNETES: &str = "Kubernetes discovery (mesh-daemon run --kubernetes)";

/// What the admin endpoint shows.
struct AdminView {
    control: Arc<Control>,
    counters: Arc<ProxyCounters>,
    tunnel: Arc<TunnelCounters>,
}

impl admin::AdminSource for AdminView {
    fn readiness(&self) -> Result<(), admin::NotReady> {
        self.control.readiness()
    }

    fn stats_json(&self) -> serde_json::Value {
        let kernel: serde_json::Map<String, serde_json::Value> = match self.control.kernel_stats() {
            Ok(stats) => stats.into_iter().map(|(s, v)| (s.name().to_owned(), v.into())).collect(),
            Err(e) => [("error".to_owned(), e.to_string().into())].into_iter().collect(),
        };
        serde_json::json!({ "proxy": self.counters.snapshot(), "kernel": kernel, "tunnel": self.tunnel.snapshot() })
    }

    fn metrics(&self) -> String {
        self.control.render_metrics()
    }

    fn config_dump(&self) -> serde_json::Value {
        let s = self.control.snapshot();
        serde_json::json!({ "generation": s.generation, "state": s.state })
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

/// The TCP listener named `name` at `addr`: the one the running daemon
/// handed over when it listens there, else a new one.
async fn tcp_listener(
    taken: &mut Option<Taken>,
    name: &str,
    addr: SocketAddr,
    flag: &str,
) -> anyhow::Result<TcpListener> {
    if let Some(fd) = taken.as_mut().and_then(|t| t.take(name)) {
        let l = std::net::TcpListener::from(fd);
        match l.local_addr() {
            Ok(a) if a == addr && handover::is_listening(l.as_fd()) => {
                l.set_nonblocking(true)?;
                info!(listener = name, %addr, "listening on the socket handed over");
                return Ok(TcpListener::from_std(l)?);
            }
            other => {
                warn!(listener = name, handed = ?other.ok(), %flag, %addr, "the running daemon's listener is elsewhere; listening anew")
            }
        }
    }
    TcpListener::bind(addr).await.with_context(|| {
        format!(
            "{flag} {addr}: cannot listen (if an older mesh-daemon without handover runs on this node, stop it first)"
        )
    })
}

/// A listener for relayed traffic. Its accepted sockets inherit
/// TCP_NODELAY (no call per connection): small writes such as responses
/// and HTTP/2 WINDOW_UPDATEs must not wait for Nagle and delayed ACKs.
async fn relay_listener(
    taken: &mut Option<Taken>,
    name: &str,
    addr: SocketAddrV4,
    flag: &str,
) -> anyhow::Result<TcpListener> {
    let l = tcp_listener(taken, name, addr.into(), flag).await?;
    nix::sys::socket::setsockopt(&l, nix::sys::socket::sockopt::TcpNoDelay, &true)
        .with_context(|| format!("{flag} {addr}: setting TCP_NODELAY"))?;
    Ok(l)
}

/// The old daemon's side of a handover (see [`handover`]).
struct Predecessor {
    control: Arc<Control>,
    datapath: DatapathConfig,
    drain: Drain,
    runtime: tokio::runtime::Handle,
    handed_over: tokio::sync::mpsc::UnboundedSender<handover::Peer>,
}

impl handover::Owner for Predecessor {
    fn suspend(&self) -> Result<u64, handover::HandoverError> {
        self.control.suspend().map_err(|e| handover::HandoverError::Owner(e.to_string()))
    }

    fn resume(&self) {
        if self.drain.is_draining() {
            info!("draining already: the datapath stays pinned for the next daemon");
            return;
        }
        let _rt = self.runtime.enter();
        let r = Datapath::load(&self.datapath)
            .map_err(|e| e.to_string())
            .and_then(|(dp, _orig)| self.control.resume(dp).map_err(|e| e.to_string()));
        match r {
            Ok(()) => info!("took the datapath back; serving on"),
            Err(e) => tracing::error!(error = %e, "cannot take the datapath back after a failed handover"),
        }
    }

    fn handed_over(&self, to: &handover::Peer) {
        let _ = self.handed_over.send(to.clone());
    }
}

pub async fn run(args: RunArgs, log_drops: crate::telemetry::logwriter::DroppedLines) -> anyhow::Result<()> {
    raise_nofile_limit();
    let node = NodeName::parse(&args.node).map_err(|e| anyhow!("--node: {e}"))?;
    #[cfg(feature = "kubernetes")]
    let kube = match args.kubernetes {
        true => Some(crate::discovery::watch::connect().await?),
        false => None,
    };
    #[cfg(not(feature = "kubernetes"))]
    if args.kubernetes {
        anyhow::bail!(
            "--kubernetes: this mesh-daemon was built without Kubernetes discovery; \
             build it with `cargo build --release -p mesh-daemon --features kubernetes` or use the container image"
        );
    }
    crate::identity::Identity::check_trust_domain(&args.trust_domain).map_err(|e| anyhow!("--trust-domain: {e}"))?;
    let metrics = Arc::new(Metrics::new());
    metrics.watch_log_drops(log_drops);
    let tunnel_counters = Arc::new(TunnelCounters::new(&metrics));
    let spans = Arc::new(match &args.otlp_endpoint {
        Some(endpoint) => {
            info!(%endpoint, protocol = ?args.otlp_protocol, "exporting spans of sampled requests over OTLP");
            Spans::start(
                endpoint.clone(),
                args.otlp_protocol,
                node.to_string(),
                metrics.spans_exported.clone(),
                metrics.spans_dropped.clone(),
            )
        }
        None => Spans::disabled(),
    });
    let cfg = ControlConfig {
        node: node.clone(),
        state_dir: args.state_dir.clone(),
        proxy_listen: args.proxy_listen,
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
    };
    let (health_tx, mut health_rx) = tokio::sync::mpsc::unbounded_channel();
    let cgroup = match &args.cgroup {
        Some(c) => c.clone(),
        None => datapath::cgroup2_root().context("finding the cgroup2 root (or give --cgroup)")?,
    };
    let pin_dir = args.pin_dir.clone().unwrap_or_else(|| PathBuf::from("/sys/fs/bpf/mesh").join(node.as_str()));

    let issuers = (!args.issuer.is_empty()).then(|| args.issuer.clone());
    let certs = match (&args.ca_cert, &args.ca_key, &args.trust_bundle, issuers, &args.issuer_token) {
        (_, _, Some(bundle), Some(addrs), Some(token)) => {
            let roots = tls::trust_bundle(bundle).map_err(|e| anyhow!("--trust-bundle {e}"))?;
            std::fs::metadata(token).with_context(|| format!("--issuer-token {}: cannot read it", token.display()))?;
            let token = token.clone();
            let client = crate::identity::issuer::IssuerClient::new(
                addrs.clone(),
                token,
                roots.clone(),
                args.trust_domain.clone(),
            );
            let addr = addrs.join(", ");
            let id = crate::identity::Identity::node(&args.trust_domain, &node);
            let certs = Certs::from_issuer(&args.trust_domain, client, roots, args.cert_lifetime, id)
                .await
                .map_err(|e| anyhow!("--issuer {addr}: {e}"))?;
            info!(issuer = %addr, "certificates come from the issuer; this node holds no CA key");
            Some(certs)
        }
        (Some(cert), Some(key), Some(bundle), None, _) => {
            let ca = Ca::from_files(cert, key)?;
            let roots = tls::trust_bundle(bundle).map_err(|e| anyhow!("--trust-bundle {e}"))?;
            let id = crate::identity::Identity::node(&args.trust_domain, &node);
            Some(Certs::new(&args.trust_domain, ca, roots, args.cert_lifetime, id)?)
        }
        _ => {
            warn!("no --issuer (or --ca-cert/--ca-key) with --trust-bundle: the mTLS tunnel is off, and cross-node endpoints of services with mtls: required are refused");
            None
        }
    };

    // A daemon running on this node hands over its listening sockets: it
    // stops writing the maps now, so the state read next is final.
    let handover_path = args.handover_socket.clone().unwrap_or_else(|| args.state_dir.join("handover.sock"));
    let mut taken = handover::take_over(&handover_path)
        .with_context(|| format!("--handover-socket {}", handover_path.display()))?;
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
    let mut prepared = Control::prepare(cfg, args.config.clone())?;
    // The readers of every accepted state, each deriving its own view.
    let local =
        Local { node: node.clone(), trust_domain: args.trust_domain.clone(), tunnel_port: args.tunnel_listen.port() };
    let routes = Arc::new(RoutesView::new(prepared.registry(), local, metrics.clone()));
    let inbound = Arc::new(InboundView::new(node.clone(), &args.trust_domain, metrics.clone()));
    let health = Arc::new(HealthView::new(prepared.registry(), health_tx));
    prepared.subscribe(routes.clone());
    prepared.subscribe(inbound.clone());
    prepared.subscribe(health.clone());

    // Listen before attaching, so nothing is redirected to a closed port.
    let listener = relay_listener(&mut taken, OUTBOUND, args.proxy_listen, "--proxy-listen").await?;
    let admin_listener = tcp_listener(&mut taken, ADMIN, args.admin_listen, "--admin-listen").await?;
    let access = Arc::new(api::Access::new(args.api_group.as_deref())?);
    let api_listener = match taken.as_mut().and_then(|t| t.take(API)) {
        Some(fd) if handover::unix_path(fd.as_fd()).as_deref() == Some(args.api_socket.as_path()) => {
            let l = std::os::unix::net::UnixListener::from(fd);
            l.set_nonblocking(true)?;
            info!(socket = %args.api_socket.display(), "control API listening on the socket handed over");
            tokio::net::UnixListener::from_std(l)?
        }
        _ => api::bind(&args.api_socket, &access)
            .with_context(|| format!("--api-socket {}", args.api_socket.display()))?,
    };
    let tunnel_listener = match &certs {
        Some(_) => Some(relay_listener(&mut taken, TUNNEL, args.tunnel_listen, "--tunnel-listen").await?),
        None => None,
    };
    // Copies to hand to the next daemon.
    let mut copies = vec![(OUTBOUND, listener.as_fd().try_clone_to_owned()?)];
    copies.push((ADMIN, admin_listener.as_fd().try_clone_to_owned()?));
    copies.push((API, api_listener.as_fd().try_clone_to_owned()?));
    if let Some(l) = &tunnel_listener {
        copies.push((TUNNEL, l.as_fd().try_clone_to_owned()?));
    }
    let dp_cfg = DatapathConfig {
        cgroup,
        pin_dir,
        ebpf_log_level: args.ebpf_log_level.to_aya(),
        slot_entries: args.slot_entries,
    };
    let (dp, orig) = Datapath::load(&dp_cfg)?;
    let view = match MapsView::open(&dp_cfg.pin_dir) {
        Ok(v) => v,
        Err(e) => {
            // Never remove a datapath a running daemon may take back.
            let ours = !dp.reused() && taken.is_none();
            dp.shutdown(ours);
            return Err(anyhow!("opening the pinned maps: {e}"));
        }
    };
    let control = match prepared.attach(dp, view) {
        Ok(c) => Arc::new(c),
        Err(failed) => {
            let (e, dp) = *failed;
            // A datapath this start attached is removed again; one that was
            // running before (or that the running daemon takes back) is left.
            let ours = !dp.reused() && taken.is_none();
            dp.shutdown(ours);
            return Err(e.into());
        }
    };
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

    metrics.serve_live(Arc::new(LiveView(Arc::downgrade(&control))));
    let counters = Arc::new(ProxyCounters::new(&metrics));
    // `drain` stops the listeners that take traffic; `exit` the admin
    // endpoint, once the drain is over.
    let (drain, exit) = (Drain::new(), Drain::new());
    let mut tasks = Vec::new();
    let pool = match (&certs, tunnel_listener) {
        (Some(certs), Some(l)) => {
            let cfg =
                tls::server_config(certs.node_cert(), certs.roots.clone()).map_err(|e| anyhow!("tunnel TLS: {e}"))?;
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
            let handler = Arc::new(InboundHandler {
                view: inbound.view(),
                counters: tunnel_counters.clone(),
                drain: drain.clone(),
                spans: spans.clone(),
                idle: args.idle_timeout,
            });
            tasks.push(tokio::spawn(crate::tunnel::server::serve(
                l,
                acceptor,
                handler,
                tunnel_counters.clone(),
                crate::tunnel::server::PerPeer::new(crate::tunnel::server::PeerLimits {
                    connections: args.tunnel_connections_per_peer,
                    streams: args.tunnel_streams_per_peer,
                }),
                drain.clone(),
            )));
            tasks.push(tokio::spawn(certs.clone().renew_loop()));
            info!(tunnel = %args.tunnel_listen, identity = %certs.node_id(), "mTLS tunnel listening");
            Some(Pool::new(certs.clone()))
        }
        _ => None,
    };
    #[cfg(feature = "kubernetes")]
    if let Some(client) = kube {
        let (c, stop) = (control.clone(), drain.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = crate::discovery::watch::run(client, c, PathBuf::from("/proc"), stop).await {
                tracing::error!(error = %e, "Kubernetes discovery stopped; the state stays as it was");
            }
        }));
    }
    let outbound = Outbound {
        spans: spans.clone(),
        listener,
        orig,
        routes: routes.table(),
        counters: counters.clone(),
        tunnel: pool,
        upstreams: routes.upstreams(),
        detect_timeout: args.protocol_detect_timeout,
        idle: args.idle_timeout,
        env: crate::env::live(),
    };
    let proxy_task = tokio::spawn(outbound.run(drain.clone()));
    let view = Arc::new(AdminView { control: control.clone(), counters, tunnel: tunnel_counters });
    let admin_task = tokio::spawn(admin::serve(admin_listener, view, args.client_header_timeout, exit.clone()));
    let api_task =
        tokio::spawn(api::serve(api_listener, control.clone(), access, args.client_header_timeout, drain.clone()));
    // Health changes reach the kernel slot tables at once.
    let resync_control = control.clone();
    let resync_task = tokio::spawn(async move {
        while let Some(first) = health_rx.recv().await {
            let mut changed = vec![first];
            while let Ok(a) = health_rx.try_recv() {
                changed.push(a);
            }
            let c = resync_control.clone();
            let _ = tokio::task::spawn_blocking(move || c.resync(&changed)).await;
        }
    });

    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    // Serving: the daemon before this one may stop accepting now, and the
    // next one can take the listeners from this one.
    if let Some(t) = taken.take() {
        let from = t.from.pid;
        t.ready()?;
        info!(from_pid = from, "serving on the listeners handed over; the daemon before this one drains");
    }
    let (handed_tx, mut handed_rx) = tokio::sync::mpsc::unbounded_channel();
    let successor = handover::Server::bind(&handover_path)
        .with_context(|| format!("--handover-socket {}", handover_path.display()));
    let successor = match successor {
        Ok(server) => {
            for (name, fd) in copies {
                server.hold(name, fd);
            }
            server.spawn(Arc::new(Predecessor {
                control: control.clone(),
                datapath: dp_cfg.clone(),
                drain: drain.clone(),
                runtime: tokio::runtime::Handle::current(),
                handed_over: handed_tx,
            }));
            Some(server)
        }
        Err(e) => {
            warn!(error = format!("{e:#}"), "no handover socket: the next daemon on this node starts with a gap");
            None
        }
    };

    if let Some(f) = &args.ready_file {
        if let Err(e) = std::fs::write(f, format!("{}\n", std::process::id())) {
            warn!(file = %f.display(), error = %e, "cannot write --ready-file; the readiness probe fails");
        }
    }

    let handed_over = tokio::select! {
        _ = term.recv() => {
            info!(signal = "SIGTERM", open = drain.open(), drain_timeout = ?args.drain_timeout, "draining: new connections are refused, open ones may finish");
            None
        }
        _ = int.recv() => {
            info!(signal = "SIGINT", open = drain.open(), drain_timeout = ?args.drain_timeout, "draining: new connections are refused, open ones may finish");
            None
        }
        Some(to) = handed_rx.recv() => {
            info!(to_pid = to.pid, open = drain.open(), drain_timeout = ?args.drain_timeout, "handed over: draining; the new daemon accepts the new connections");
            Some(to)
        }
    };
    if let Some(s) = &successor {
        s.close();
    }
    if let Some(f) = &args.ready_file {
        let _ = std::fs::remove_file(f);
    }
    drain.start();
    if handed_over.is_some() {
        // The new daemon answers the probes and the API from now on.
        exit.start();
    }
    let _ = tokio::join!(proxy_task, api_task);
    let left = tokio::select! {
        left = drain.wait_idle(args.drain_timeout) => left,
        // After a handover the pod's SIGTERM is expected: it does not cut
        // the drain, a second signal does.
        left = second_signal(&mut term, &mut int, &drain, handed_over.is_some()) => left,
    };
    if left > 0 {
        warn!(open = left, "drain ended with connections still open; they are cut");
    } else {
        info!("drained");
    }
    exit.start();
    let _ = admin_task.await;
    info!(cleanup = args.cleanup_on_exit, "shutting down");
    resync_task.abort();
    for t in tasks {
        t.abort();
    }
    health.stop();
    if handed_over.is_some() {
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

/// `mesh-daemon probe`: see its help.
pub fn probe(ready_file: &std::path::Path, admin: SocketAddr) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let pid = std::fs::read_to_string(ready_file)
        .with_context(|| format!("{}: this container's daemon does not serve (yet)", ready_file.display()))?;
    let mut s = std::net::TcpStream::connect_timeout(&admin, std::time::Duration::from_secs(2))
        .with_context(|| format!("{admin}: the admin endpoint does not answer"))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    s.write_all(b"GET /ready HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut answer = String::new();
    s.take(64 * 1024).read_to_string(&mut answer)?;
    let status = answer.split_whitespace().nth(1).unwrap_or("none");
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("").trim();
    if status != "200" {
        anyhow::bail!("{admin}/ready answered {status}: {body}");
    }
    println!("ready (pid {})", pid.trim());
    Ok(())
}

/// Resolves on the signal that ends a drain early: the next one, or the
/// one after the next when `expected_one` (a pod's SIGTERM after a
/// handover). Returns the connections still open.
async fn second_signal(
    term: &mut tokio::signal::unix::Signal,
    int: &mut tokio::signal::unix::Signal,
    drain: &Drain,
    mut expected_one: bool,
) -> usize {
    loop {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        if !expected_one {
            return drain.open();
        }
        expected_one = false;
        info!(
            open = drain.open(),
            "signal while draining after a handover: the drain goes on (a second signal cuts it)"
        );
    }
}
