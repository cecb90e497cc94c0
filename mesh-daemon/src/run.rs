//! `mesh-daemon run`: restore or seed the state, attach (or take over) the
//! datapath, serve the proxy, the control API and the admin endpoint until
//! SIGTERM/SIGINT.
//!
//! On SIGTERM the datapath stays attached and pinned by default: in-kernel
//! balancing keeps working while no daemon runs (a restart, a rolling
//! update), and the next daemon takes the pinned programs over without a
//! second attach. `--cleanup-on-exit` detaches everything and removes the
//! pins, for uninstalling.

use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tracing::info;

use crate::balance::BalanceConfig;
use crate::control::{api, Control, ControlConfig};
use crate::datapath::{self, Datapath, DatapathConfig};
use crate::model::NodeName;
use crate::proxy::Outbound;
use crate::telemetry::{admin, ProxyCounters};

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
    /// Slots per kernel-mode service table (1 to 4096); more slots follow
    /// weights more finely.
    #[arg(long, default_value_t = 256, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub slot_table_size: u32,
    /// Time constant of the peak-EWMA of connect time (e.g. 10s).
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = duration)]
    pub ewma_decay: std::time::Duration,
    /// Connect time assumed for an endpoint not measured yet.
    #[arg(long, default_value = "30ms", value_name = "DURATION", value_parser = duration)]
    pub default_rtt: std::time::Duration,
    /// Consecutive connect failures or resets that eject an endpoint.
    #[arg(long, default_value_t = 3, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100))]
    pub breaker_failures: u32,
    /// On exit, detach the programs and remove every pin (uninstall).
    /// Without it the datapath keeps working until the next daemon.
    #[arg(long)]
    pub cleanup_on_exit: bool,
    /// Highest level the kernel programs log at: off, error, warn, info,
    /// debug, trace.
    #[arg(long, default_value = "warn", value_name = "LEVEL")]
    pub ebpf_log_level: EbpfLogLevel,
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

fn duration(s: &str) -> Result<std::time::Duration, String> {
    crate::model::parse_duration(s)
}

/// What the admin endpoint shows.
struct AdminView {
    control: Arc<Control>,
    counters: Arc<ProxyCounters>,
}

impl admin::AdminSource for AdminView {
    fn ready(&self) -> bool {
        self.control.ready()
    }

    fn stats_json(&self) -> serde_json::Value {
        let kernel: serde_json::Map<String, serde_json::Value> = match self.control.kernel_stats() {
            Ok(stats) => stats.into_iter().map(|(s, v)| (s.name().to_owned(), v.into())).collect(),
            Err(e) => [("error".to_owned(), e.into())].into_iter().collect(),
        };
        serde_json::json!({ "proxy": self.counters.snapshot(), "kernel": kernel })
    }
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let node = NodeName::parse(&args.node).map_err(|e| anyhow!("--node: {e}"))?;
    let cfg = ControlConfig {
        node: node.clone(),
        state_dir: args.state_dir.clone(),
        proxy_listen: args.proxy_listen,
        slot_table_size: args.slot_table_size,
        balance: BalanceConfig {
            default_rtt: args.default_rtt,
            decay: args.ewma_decay,
            breaker_failures: args.breaker_failures,
            ..BalanceConfig::default()
        },
    };
    let (health_tx, mut health_rx) = tokio::sync::mpsc::unbounded_channel();
    let prepared = Control::prepare(cfg, args.config.clone(), health_tx)?;
    let cgroup = match &args.cgroup {
        Some(c) => c.clone(),
        None => datapath::cgroup2_root().context("finding the cgroup2 root (or give --cgroup)")?,
    };
    let pin_dir = args.pin_dir.clone().unwrap_or_else(|| PathBuf::from("/sys/fs/bpf/mesh").join(node.as_str()));

    // Listen before attaching, so nothing is redirected to a closed port.
    let listener = TcpListener::bind(args.proxy_listen)
        .await
        .with_context(|| format!("--proxy-listen {}: cannot listen", args.proxy_listen))?;
    let admin_listener = TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("--admin-listen {}: cannot listen", args.admin_listen))?;
    let access = Arc::new(api::Access::new(args.api_group.as_deref())?);
    let api_listener =
        api::bind(&args.api_socket, &access).with_context(|| format!("--api-socket {}", args.api_socket.display()))?;

    let dp_cfg = DatapathConfig { cgroup, pin_dir, ebpf_log_level: args.ebpf_log_level.to_aya() };
    let (dp, orig) = Datapath::load(&dp_cfg)?;
    let control = match prepared.attach(dp) {
        Ok(c) => Arc::new(c),
        Err(failed) => {
            let (e, dp) = *failed;
            // A datapath this start attached is removed again; one that was
            // running before is left running.
            let reused = dp.reused();
            dp.shutdown(!reused);
            return Err(e);
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

    let counters = Arc::new(ProxyCounters::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let outbound = Outbound { listener, orig, routes: control.routes(), counters: counters.clone() };
    let proxy_task = tokio::spawn(outbound.run(stop_rx.clone()));
    let view = Arc::new(AdminView { control: control.clone(), counters });
    let admin_task = tokio::spawn(admin::serve(admin_listener, view, stop_rx.clone()));
    let api_task = tokio::spawn(api::serve(api_listener, control.clone(), access, stop_rx));
    // Health changes reach the kernel slot tables at once.
    let resync_control = control.clone();
    let resync_task = tokio::spawn(async move {
        while health_rx.recv().await.is_some() {
            while health_rx.try_recv().is_ok() {}
            let c = resync_control.clone();
            let _ = tokio::task::spawn_blocking(move || c.resync()).await;
        }
    });

    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let sig = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!(signal = sig, cleanup = args.cleanup_on_exit, "shutting down");
    let _ = stop_tx.send(true);
    let _ = tokio::join!(proxy_task, admin_task, api_task);
    resync_task.abort();
    let _ = std::fs::remove_file(&args.api_socket);
    control.shutdown(args.cleanup_on_exit);
    Ok(())
}
