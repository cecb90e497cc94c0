//! `mesh-daemon`: the node daemon of the mesh.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use mesh_daemon::telemetry::logwriter::{self, DroppedLines, FlushOnDrop};
use mesh_daemon::{model, run};

#[derive(Parser)]
#[command(name = "mesh-daemon", version, about = "eBPF-accelerated node-level service-mesh proxy")]
struct Cli {
    /// Log format.
    #[arg(long, global = true, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the datapath and run the proxy until SIGTERM/SIGINT.
    Run(Box<run::RunArgs>),
    /// Make a mesh CA, or issue a certificate from one.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Readiness of this container's daemon, for an exec probe: 0 when it
    /// serves (its --ready-file exists: it holds the listeners, not a
    /// daemon it is taking over from) and its admin /ready answers 200.
    Probe {
        /// The daemon's --ready-file.
        #[arg(long, value_name = "FILE")]
        ready_file: std::path::PathBuf,
        /// The daemon's --admin-listen.
        #[arg(long, default_value = "127.0.0.1:15020", value_name = "ADDR")]
        admin: std::net::SocketAddr,
    },
    /// Validate a config file and exit: 0 when valid, 1 with every bad field named.
    Check {
        #[arg(long, value_name = "FILE")]
        config: std::path::PathBuf,
    },
    /// Print a reference page (Markdown) of this build: every metric it
    /// exports, or every route of its control API.
    Reference {
        #[arg(value_enum)]
        page: ReferencePage,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ReferencePage {
    /// Name, type, labels and help of each series on /metrics.
    Metrics,
    /// Method, path, body and answer of each control API route.
    Api,
}

#[derive(Subcommand)]
enum CaCommand {
    /// Write a new self-signed CA to DIR/ca.pem and DIR/ca.key.
    Init {
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        #[arg(long, value_name = "DIR")]
        out: std::path::PathBuf,
        /// Lifetime of the CA certificate, in days.
        #[arg(long, default_value_t = 365)]
        days: u64,
    },
    /// Run the issuer: the one process that holds the CA key. Nodes send
    /// it CSRs with their credential; it signs a node's own identity and
    /// the identities of the workloads the state places on that node.
    Serve {
        #[arg(long, value_name = "IP:PORT", default_value = "0.0.0.0:15012")]
        listen: std::net::SocketAddr,
        #[arg(long, value_name = "FILE")]
        ca_cert: std::path::PathBuf,
        #[arg(long, value_name = "FILE")]
        ca_key: std::path::PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// The node credentials (`ca bootstrap` writes it); not with --kubernetes.
        #[arg(long, value_name = "FILE", required_unless_present = "kubernetes", conflicts_with = "kubernetes")]
        credentials: Option<std::path::PathBuf>,
        /// The state document: which workloads run on which node; not with --kubernetes.
        #[arg(long, value_name = "FILE", required_unless_present = "kubernetes", conflicts_with = "kubernetes")]
        config: Option<std::path::PathBuf>,
        /// Authenticate nodes by their projected service-account tokens
        /// (TokenReview) and place workloads by the pods' spec.nodeName,
        /// asking the API server (in a pod: its service account; else
        /// KUBECONFIG).
        #[arg(long)]
        kubernetes: bool,
        /// With --kubernetes: the audience node tokens must be minted for.
        #[arg(long, default_value = mesh_daemon::identity::kube::AUDIENCE, requires = "kubernetes")]
        audience: String,
        /// With --kubernetes: the node daemons' service account, NAMESPACE/NAME.
        #[arg(long, default_value = "mesh-system/mesh-daemon", value_name = "NAMESPACE/NAME", requires = "kubernetes")]
        node_account: String,
        /// Lifetime of issued certificates.
        #[arg(long, default_value_t = 86400)]
        seconds: u64,
    },
    /// Make a node's credential for the issuer: writes its token to OUT
    /// (mode 0600; give it to that node's daemon as --issuer-token) and its
    /// hash to the credentials file. Run it again to replace it.
    Bootstrap {
        #[arg(long, value_name = "FILE")]
        credentials: std::path::PathBuf,
        #[arg(long, value_name = "NODE")]
        node: String,
        #[arg(long, value_name = "FILE")]
        out: std::path::PathBuf,
    },
    /// Ask the issuer for a certificate as a node would (to check a
    /// credential or the issuer): prints what it answered; exit 1 if refused.
    Request {
        #[arg(long, value_name = "HOST:PORT", value_parser = mesh_daemon::identity::issuer::host_port)]
        issuer: String,
        #[arg(long, value_name = "FILE")]
        token: std::path::PathBuf,
        /// PEM CA certificates the issuer's certificate must chain to.
        #[arg(long, value_name = "FILE")]
        trust_bundle: std::path::PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        #[arg(long, value_name = "SPIFFE-ID")]
        id: String,
    },
    /// Issue a certificate for a SPIFFE ID: DIR/cert.pem (chain) and DIR/key.pem.
    Issue {
        #[arg(long, value_name = "FILE")]
        ca_cert: std::path::PathBuf,
        #[arg(long, value_name = "FILE")]
        ca_key: std::path::PathBuf,
        /// e.g. spiffe://cluster.local/ns/default/sa/web
        #[arg(long, value_name = "SPIFFE-ID")]
        id: String,
        /// How long it is valid, in seconds.
        #[arg(long, default_value_t = 86400)]
        seconds: u64,
        #[arg(long, value_name = "DIR")]
        out: std::path::PathBuf,
    },
}

fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::File::options().write(true).create(true).truncate(true).mode(0o600).open(path)?.write_all(text.as_bytes())
}

/// The issuer's Kubernetes authority (`ca serve --kubernetes`).
#[cfg(feature = "kubernetes")]
async fn kube_authority(
    audience: String,
    node_account: &str,
) -> anyhow::Result<mesh_daemon::identity::issuer::Authority> {
    let (ns, name) =
        node_account.split_once('/').filter(|(a, b)| !a.is_empty() && !b.is_empty() && !b.contains('/')).ok_or_else(
            || anyhow::anyhow!("--node-account {node_account:?}: give NAMESPACE/NAME (e.g. mesh-system/mesh-daemon)"),
        )?;
    let client = kube::Client::try_default().await.map_err(|e| {
        anyhow::anyhow!(
            "--kubernetes: no API server: {e} (in a pod: give it a service account; elsewhere: set KUBECONFIG)"
        )
    })?;
    Ok(mesh_daemon::identity::issuer::Authority::Kubernetes(mesh_daemon::identity::kube::Kube {
        client,
        audience,
        account: (ns.to_owned(), name.to_owned()),
    }))
}

/// Starts writing route status on `rt` with the authority's client.
#[cfg(feature = "kubernetes")]
fn route_status(rt: &tokio::runtime::Runtime, authority: &mesh_daemon::identity::issuer::Authority) {
    if let mesh_daemon::identity::issuer::Authority::Kubernetes(k) = authority {
        rt.spawn(mesh_daemon::write_route_status(k.client.clone()));
    }
}

#[cfg(not(feature = "kubernetes"))]
fn route_status(_: &tokio::runtime::Runtime, _: &mesh_daemon::identity::issuer::Authority) {}

#[cfg(not(feature = "kubernetes"))]
async fn kube_authority(
    _audience: String,
    _node_account: &str,
) -> anyhow::Result<mesh_daemon::identity::issuer::Authority> {
    anyhow::bail!(
        "--kubernetes: this mesh-daemon was built without Kubernetes support; \
         build it with `cargo build --release -p mesh-cli --features kubernetes` or use the container image"
    )
}

fn ca(cmd: CaCommand) -> anyhow::Result<()> {
    use mesh_daemon::identity::certs::Ca;
    use mesh_daemon::identity::Identity;
    match cmd {
        CaCommand::Init { trust_domain, out, days } => {
            Identity::check_trust_domain(&trust_domain)?;
            let (cert, key) = Ca::generate(&trust_domain, std::time::Duration::from_secs(days * 86400))?;
            std::fs::create_dir_all(&out)?;
            std::fs::write(out.join("ca.pem"), cert)?;
            write_private(&out.join("ca.key"), &key)?;
            println!("CA for {trust_domain} written to {}/ca.pem and ca.key", out.display());
        }
        CaCommand::Serve {
            listen,
            ca_cert,
            ca_key,
            trust_domain,
            credentials,
            config,
            kubernetes: _,
            audience,
            node_account,
            seconds,
        } => {
            use mesh_daemon::identity::issuer::Authority;
            Identity::check_trust_domain(&trust_domain)?;
            let ca = Ca::from_files(&ca_cert, &ca_key)?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let authority = match (credentials, config) {
                (Some(credentials), Some(state)) => Authority::tokens(credentials, state),
                _ => {
                    let authority = rt.block_on(kube_authority(audience, &node_account))?;
                    // The one writer of route status in the cluster.
                    route_status(&rt, &authority);
                    authority
                }
            };
            let cfg = mesh_daemon::identity::issuer::IssuerConfig {
                listen,
                ca,
                trust_domain,
                lifetime: std::time::Duration::from_secs(seconds),
                authority,
            };
            rt.block_on(mesh_daemon::identity::issuer::serve(cfg))?;
        }
        CaCommand::Bootstrap { credentials, node, out } => {
            let node = model::NodeName::parse(&node).map_err(|e| anyhow::anyhow!("--node: {e}"))?;
            let token = mesh_daemon::identity::issuer::Credentials::bootstrap(&credentials, &node)
                .map_err(|e| anyhow::anyhow!("--credentials {e}"))?;
            write_private(&out, &token)?;
            println!("credential of node {node} written to {} (its hash to {})", out.display(), credentials.display());
        }
        CaCommand::Request { issuer, token, trust_bundle, trust_domain, id } => {
            let id = Identity::parse(&id)?;
            let roots = mesh_daemon::identity::tls::trust_bundle(&trust_bundle)
                .map_err(|e| anyhow::anyhow!("--trust-bundle {e}"))?;
            let client = mesh_daemon::identity::issuer::IssuerClient::new(vec![issuer], token, roots, trust_domain);
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let issued = rt.block_on(client.issue(&id, 1))?;
            let left = issued.not_after.duration_since(std::time::SystemTime::now()).unwrap_or_default();
            println!("issued {id}, valid for {} s more", left.as_secs());
        }
        CaCommand::Issue { ca_cert, ca_key, id, seconds, out } => {
            let id = Identity::parse(&id)?;
            let ca = Ca::from_files(&ca_cert, &ca_key)?;
            let issued = ca.issue(&id, std::time::Duration::from_secs(seconds), 1)?;
            let pem = |label: &str, der: &[u8]| pem::encode(&pem::Pem::new(label, der.to_vec()));
            let chain: String = issued.chain.iter().map(|c| pem("CERTIFICATE", c.as_ref())).collect();
            let key = pem("PRIVATE KEY", issued.key.secret_der());
            std::fs::create_dir_all(&out)?;
            std::fs::write(out.join("cert.pem"), chain)?;
            write_private(&out.join("key.pem"), &key)?;
            println!("certificate for {id} written to {}/cert.pem and key.pem", out.display());
        }
    }
    Ok(())
}

/// The async runtime; `threads` 0: one worker per CPU.
fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = match threads {
        // One worker: no work stealing to pay for.
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if threads > 1 {
        b.worker_threads(threads);
    }
    b.enable_all().build()
}

/// Logs go to stderr through a writer thread (see
/// [`mesh_daemon::telemetry::logwriter`]); the guard writes what is left.
fn init_logs(format: LogFormat) -> (DroppedLines, FlushOnDrop) {
    // RUST_LOG overrides; aya-log records arrive through the `log` bridge.
    // kube-client logs every failed API request at error; discovery
    // reports a failing watch once, with the error, instead.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube_client::client::builder=off"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, dropped, flush) = logwriter::start(std::io::stderr());
    mesh_daemon::telemetry::line::install(writer.clone(), matches!(format, LogFormat::Json));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    (dropped, flush)
}

/// `e` and its causes, each said once: a typed error's message often ends
/// with its cause already (`--issuer-token X: cannot read it: No such
/// file`), which `{:#}` would repeat.
fn chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.ends_with(&c) {
            out = format!("{out}: {c}");
        }
    }
    out
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let (log_drops, log_flush) = init_logs(cli.log_format);
    let result = match cli.command {
        Command::Check { config } => model::load_file(&config)
            .map(|s| {
                println!(
                    "{}: valid ({} nodes, {} workloads, {} services)",
                    config.display(),
                    s.nodes.len(),
                    s.workloads.len(),
                    s.services.len()
                );
            })
            .map_err(anyhow::Error::from),
        Command::Ca { command } => ca(command),
        Command::Reference { page } => {
            print!(
                "{}",
                match page {
                    ReferencePage::Metrics => run::reference::metrics_page(),
                    ReferencePage::Api => run::reference::api_page(),
                }
            );
            Ok(())
        }
        Command::Probe { ready_file, admin } => run::probe(&ready_file, admin).map_err(anyhow::Error::from),
        Command::Run(args) => match runtime(args.worker_threads) {
            Ok(rt) => rt.block_on(run::run(*args, log_drops)).map_err(anyhow::Error::from),
            Err(e) => Err(anyhow::Error::from(e).context("starting the async runtime")),
        },
    };
    // Logged lines first, then the error.
    drop(log_flush);
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
