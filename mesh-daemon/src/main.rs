//! `mesh-daemon`: the node daemon of the mesh.

use clap::{Parser, Subcommand};
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
    /// Validate a config file and exit: 0 when valid, 1 with every bad field named.
    Check {
        #[arg(long, value_name = "FILE")]
        config: std::path::PathBuf,
    },
}

fn init_logs(format: LogFormat) {
    // RUST_LOG overrides; aya-log records arrive through the `log` bridge.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format);
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
        Command::Run(args) => match tokio::runtime::Runtime::new() {
            Ok(rt) => rt.block_on(run::run(*args)),
            Err(e) => Err(anyhow::Error::from(e).context("starting the async runtime")),
        },
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
