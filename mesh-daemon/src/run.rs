//! `mesh-daemon run`: load the state, attach the datapath, serve the proxy
//! and the admin endpoint until SIGTERM/SIGINT, then detach and unpin.

use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context};
use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::datapath::{self, Datapath, DatapathConfig, MapContents};
use crate::model::{self, NodeName, State};
use crate::proxy::{Outbound, RouteTable};
use crate::telemetry::{admin, ProxyCounters};

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// The state: nodes, workloads and services (YAML or JSON).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Which node of the config this daemon runs on.
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    pub node: String,
    /// cgroup2 directory to attach the programs to [default: the cgroup2 root,
    /// from /proc/self/mountinfo].
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// Where maps are pinned [default: /sys/fs/bpf/mesh/<node>].
    #[arg(long, value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,
    /// Outbound listener, the target of redirected connections. With an
    /// unspecified IP, pods are sent to the node's address from the config.
    #[arg(long, default_value = "0.0.0.0:15001", value_name = "ADDR")]
    pub proxy_listen: SocketAddrV4,
    /// Admin HTTP endpoint (/live, /ready, /stats).
    #[arg(long, default_value = "127.0.0.1:15020", value_name = "ADDR")]
    pub admin_listen: SocketAddr,
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

/// The node-local view the daemon needs after start.
struct Local {
    state: State,
    node: NodeName,
    proxy: SocketAddrV4,
    /// Netns cookies of this node's workloads.
    cookies: Vec<u64>,
}

fn prepare(args: &RunArgs) -> anyhow::Result<Local> {
    let state = model::load_file(&args.config)?;
    let node = NodeName::parse(&args.node).map_err(|e| anyhow!("--node: {e}"))?;
    let Some(me) = state.node(&node) else {
        let names: Vec<_> = state.nodes.iter().map(|n| n.name.as_str()).collect();
        bail!(
            "--node {node}: no such node in {}; the nodes there are: {}",
            args.config.display(),
            if names.is_empty() {
                "(none)".to_owned()
            } else {
                names.join(", ")
            }
        );
    };
    let proxy_ip = if args.proxy_listen.ip().is_unspecified() {
        me.address
    } else {
        *args.proxy_listen.ip()
    };
    let proxy = SocketAddrV4::new(proxy_ip, args.proxy_listen.port());

    let own = datapath::own_netns_cookie().context("reading the daemon's own network namespace")?;
    let mut cookies = Vec::new();
    let mut errors = Vec::new();
    for (i, w) in state
        .workloads
        .iter()
        .enumerate()
        .filter(|(_, w)| w.node == node)
    {
        let path = w.netns.path();
        match datapath::netns_cookie(&path) {
            Ok(c) if c == own => errors.push(format!(
                "workloads[{i}] ({}/{}): {} is the daemon's own network namespace; a host-network pod cannot be enrolled",
                w.namespace,
                w.name,
                path.display()
            )),
            Ok(c) => cookies.push(c),
            Err(e) => errors.push(format!(
                "workloads[{i}] ({}/{}): cannot open network namespace {}: {e}",
                w.namespace,
                w.name,
                path.display()
            )),
        }
    }
    if !errors.is_empty() {
        bail!("config {}:\n{}", args.config.display(), errors.join("\n"));
    }
    Ok(Local {
        state,
        node,
        proxy,
        cookies,
    })
}

struct Daemon {
    datapath: Mutex<Option<Datapath>>,
    counters: Arc<ProxyCounters>,
}

impl admin::AdminSource for Daemon {
    fn ready(&self) -> bool {
        self.datapath.lock().map(|d| d.is_some()).unwrap_or(false)
    }

    fn stats_json(&self) -> serde_json::Value {
        let kernel: serde_json::Map<String, serde_json::Value> = match self.datapath.lock() {
            Ok(guard) => match guard.as_ref().map(Datapath::stats) {
                Some(Ok(stats)) => stats
                    .into_iter()
                    .map(|(s, v)| (s.name().to_owned(), v.into()))
                    .collect(),
                Some(Err(e)) => [("error".to_owned(), e.to_string().into())]
                    .into_iter()
                    .collect(),
                None => Default::default(),
            },
            Err(_) => Default::default(),
        };
        serde_json::json!({ "proxy": self.counters.snapshot(), "kernel": kernel })
    }
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let local = prepare(&args)?;
    let cgroup = match &args.cgroup {
        Some(c) => c.clone(),
        None => datapath::cgroup2_root().context("finding the cgroup2 root (or give --cgroup)")?,
    };
    let pin_dir = args
        .pin_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("/sys/fs/bpf/mesh").join(local.node.as_str()));

    // Listen before attaching, so nothing is redirected to a closed port.
    let listener = TcpListener::bind(args.proxy_listen)
        .await
        .with_context(|| format!("--proxy-listen {}: cannot listen", args.proxy_listen))?;
    let admin_listener = TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("--admin-listen {}: cannot listen", args.admin_listen))?;

    let frontends = local.state.frontends();
    let routes = Arc::new(ArcSwap::from_pointee(RouteTable::build(
        &local.state,
        &frontends,
    )));
    let cfg = DatapathConfig {
        cgroup: cgroup.clone(),
        pin_dir: pin_dir.clone(),
        ebpf_log_level: args.ebpf_log_level.to_aya(),
    };
    let (mut dp, orig) = Datapath::load(&cfg)?;
    let want = MapContents::build(&local.state, &frontends, &local.cookies, local.proxy);
    if let Err(e) = dp.sync(&want) {
        dp.shutdown();
        return Err(e).context("writing the maps");
    }
    info!(
        node = %local.node,
        workloads = local.cookies.len(),
        service_ports = frontends.len(),
        proxy = %local.proxy,
        admin = %args.admin_listen,
        "mesh-daemon running"
    );

    let counters = Arc::new(ProxyCounters::default());
    let daemon = Arc::new(Daemon {
        datapath: Mutex::new(Some(dp)),
        counters: counters.clone(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let outbound = Outbound {
        listener,
        orig,
        routes,
        counters,
    };
    let proxy_task = tokio::spawn(outbound.run(stop_rx.clone()));
    let admin_task = tokio::spawn(admin::serve(admin_listener, daemon.clone(), stop_rx));

    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let sig = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!(signal = sig, "shutting down");
    let _ = stop_tx.send(true);
    let _ = proxy_task.await;
    let _ = admin_task.await;
    match daemon.datapath.lock() {
        Ok(mut guard) => {
            if let Some(dp) = guard.take() {
                dp.shutdown();
            }
        }
        Err(_) => warn!(
            "datapath lock poisoned; pins under {} may be left",
            pin_dir.display()
        ),
    }
    Ok(())
}
