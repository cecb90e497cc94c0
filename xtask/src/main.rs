//! Developer entry points: `cargo xtask setup | test | demo | bench | kind | clean`.

mod bench;
mod demo;
mod docs;
mod fuzz;
mod kind;
mod layers;
mod lint;
mod scale;
mod setup;
mod soak;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Set up, test and demo the mesh")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what builds and tests need (idempotent, quiet when all is there).
    Setup,
    /// Set up, build, and run every test (unit and end-to-end; needs root).
    Test {
        /// Passed to the test binaries (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run the mesh on a built-in mini cluster and show where requests went.
    Demo {
        /// How many requests the client sends.
        #[arg(long, default_value_t = 200)]
        requests: u32,
    },
    /// Measure direct, kernel, proxy-local, proxy-mtls and HAProxy in one run.
    Bench {
        /// A second per measurement: checks every path works, not how fast.
        #[arg(long)]
        quick: bool,
        /// Measure only these paths (comma-separated: direct, kernel,
        /// proxy-local, proxy-mtls, haproxy); for profiling one path.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Seconds per measurement (default 5; 1 with --quick).
        #[arg(long)]
        seconds: Option<u64>,
        /// Rounds over all paths; each figure is the median (default 3; 1 with --quick).
        #[arg(long)]
        rounds: Option<usize>,
        /// Instead: what cluster size costs one node (1k and 10k services
        /// x 10 endpoints, proxy and kernel mode; bench/results/scale.md).
        #[arg(long, conflicts_with_all = ["only", "seconds", "rounds"])]
        scale: bool,
        /// With --quick: run on the debug build instead of building the
        /// release one (`cargo xtask test` does; the numbers are not for
        /// comparison).
        #[arg(long, requires = "quick")]
        debug: bool,
        /// Instead: the instructions an HTTP/2 and an HTTP/1.1 request
        /// cost through the proxy, counted by callgrind on fixed
        /// in-process loads (the same count for the same code, however
        /// busy the machine).
        #[arg(long, conflicts_with_all = ["only", "seconds", "rounds", "scale", "quick"])]
        instructions: bool,
    },
    /// Fuzz every target of fuzz/ (cargo-fuzz, libFuzzer, nightly) for a
    /// bounded time each, from its corpus; fails on the first crash.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only these targets (default: all).
        targets: Vec<String>,
    },
    /// Mixed traffic on the mini cluster for a bounded time (new
    /// connections, long streams, the tunnel, kernel mode, API writes, one
    /// daemon upgrade per node in the middle), sampling descriptors, RSS
    /// and failed requests every second; fails on any failed request or
    /// on growth that does not come back.
    Soak {
        #[arg(long, default_value_t = 5)]
        minutes: u64,
    },
    /// Deploy on a kind cluster in Docker (deploy/kind-config.yaml) and
    /// check a meshed pod reaches a Service through the mesh. Needs Docker,
    /// kind and kubectl.
    Kind,
    /// Build the book of docs/ into target/book (mdBook), writing its
    /// generated reference pages first; fails on a broken link.
    Docs {
        /// Write nothing: fail when a generated page differs from what the
        /// code generates now (a gate of `test`).
        #[arg(long)]
        check: bool,
    },
    /// Remove namespaces, cgroups, pins and logs left by crashed test runs.
    Clean,
    /// Print the daemon's layers and the edges between them; fails on a
    /// back-edge or a cycle between files (also a gate of `test`).
    Layers,
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// Runs a command in the workspace root, streaming its output.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.current_dir(root()).status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// The daemon's features in every build xtask makes, tests and the
/// container image alike (deploy/Dockerfile; a test keeps them equal).
pub const FEATURES: &str = "mesh-cli/kubernetes";

/// Builds the daemon (with its kernel programs) and the pod tools.
pub fn build_bins(release: bool) -> anyhow::Result<()> {
    let mut cmd = cargo();
    cmd.args(["build", "--bins", "-p", "mesh-cli", "-p", "mesh-tests", "--features", FEATURES]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)
}

/// Builds the binaries a benchmark runs (release, or the debug build for
/// a check that every path runs), saying so with `say`, and points the
/// mini cluster at them.
pub fn bench_bins(release: bool, say: fn(&str)) -> anyhow::Result<()> {
    say(if release { "building release binaries" } else { "building debug binaries (--debug)" });
    build_bins(release)?;
    let dir = root().join(if release { "target/release" } else { "target/debug" });
    std::env::set_var("MESH_BIN_DIR", dir);
    Ok(())
}

/// A second build of the daemon, without the kubernetes feature, as
/// `target/debug/mesh-daemon-variant`: the upgrade tests hand over from
/// one build to another.
fn build_variant() -> anyhow::Result<()> {
    run(cargo().args(["build", "--bin", "mesh-daemon", "-p", "mesh-cli"]))?;
    let dir = root().join("target/debug");
    std::fs::copy(dir.join("mesh-daemon"), dir.join("mesh-daemon-variant")).context("copying mesh-daemon-variant")?;
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Setup => setup::setup(),
        Cmd::Test { args } => test(&args),
        Cmd::Demo { requests } => setup::demo().and_then(|_| demo::demo(requests)),
        Cmd::Bench { instructions: true, .. } => {
            setup::instructions().and_then(|_| bench::instructions::instructions())
        }
        Cmd::Bench { quick, only, seconds, rounds, scale: false, debug, .. } => {
            setup::bench().and_then(|_| bench::bench(quick, &only, seconds, rounds, !debug))
        }
        Cmd::Bench { quick, scale: true, debug, .. } => setup::bench().and_then(|_| scale::scale(quick, !debug)),
        Cmd::Kind => kind::kind(),
        Cmd::Fuzz { seconds, targets } => setup::fuzz().and_then(|_| fuzz::fuzz(seconds.max(1), &targets)),
        Cmd::Soak { minutes } => setup::demo().and_then(|_| {
            build_variant()?;
            build_bins(false)?;
            soak::soak(std::time::Duration::from_secs(minutes.max(1) * 60))
        }),
        Cmd::Docs { check } => setup::docs().and_then(|_| docs::docs(check)),
        Cmd::Clean => clean(),
        Cmd::Layers => layers::print(&root()),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Seconds per fuzz target in `cargo xtask test`.
const FUZZ_SECONDS: u64 = 20;
/// Minutes of soak in `cargo xtask test`.
const SOAK_MINUTES: u64 = 2;

fn test(args: &[String]) -> anyhow::Result<()> {
    setup::setup()?;
    eprintln!("xtask: checking formatting (cargo fmt --check) and lints (cargo clippy -D warnings)");
    eprintln!("xtask: checking the daemon's layering (cargo xtask layers)");
    layers::check(&root())?;
    bench::headline::check_readme(&root())?;
    lint::check_formatting(&root())?;
    lint::check_clippy(&root())?;
    lint::check_deny(&root())?;
    eprintln!("xtask: building the daemon, its kernel programs and the pod tools (and another build, for upgrades)");
    build_variant()?;
    build_bins(false)?;
    eprintln!("xtask: checking the book: generated pages current, every link resolves (cargo xtask docs --check)");
    docs::docs(true)?;
    eprintln!("xtask: running the tests (unit, then end-to-end on the real kernel)");
    let mut cmd = cargo();
    // Every test binary runs even after one fails, so a red run lists
    // every failure at once (and the count covers the whole suite).
    cmd.args(["test", "--no-fail-fast", "--features", FEATURES]);
    if !args.is_empty() {
        cmd.arg("--").args(args);
    }
    let (passed, failed, ok) = run_counting(&mut cmd)?;
    let bench = if ok && args.is_empty() {
        eprintln!("xtask: fuzzing every target for {FUZZ_SECONDS} s (cargo xtask fuzz)");
        fuzz::fuzz(FUZZ_SECONDS, &[])
            .and_then(|_| {
                eprintln!("xtask: a {SOAK_MINUTES}-minute soak (cargo xtask soak)");
                soak::soak(std::time::Duration::from_secs(SOAK_MINUTES * 60))
            })
            .and_then(|_| {
                eprintln!(
                    "xtask: checking that every benchmark path runs on the debug build (cargo xtask bench --quick --debug, then --scale --quick --debug)"
                );
                bench::bench(true, &[], None, None, false)
            })
            .and_then(|_| scale::scale(true, false))
    } else {
        Ok(())
    };
    // One closing line for the whole run, whatever ran last.
    println!("tests: {passed} passed, {failed} failed");
    if !ok {
        bail!("the tests failed");
    }
    bench
}

/// Runs `cargo test`, passing its output through, and adds up the
/// `test result:` lines: (passed, failed, success).
fn run_counting(cmd: &mut Command) -> anyhow::Result<(u64, u64, bool)> {
    use std::io::BufRead;
    let mut child =
        cmd.current_dir(root()).stdout(std::process::Stdio::piped()).spawn().context("running cargo test")?;
    let (mut passed, mut failed) = (0, 0);
    if let Some(out) = child.stdout.take() {
        for line in std::io::BufReader::new(out).lines() {
            let line = line?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                // "ok. 18 passed; 0 failed; ...": a count before each word.
                let num = |word: &str| {
                    rest.split(';').find_map(|p| {
                        let mut w = p.split_whitespace().rev();
                        (w.next()? == word).then(|| w.next()?.parse::<u64>().ok()).flatten()
                    })
                };
                passed += num("passed").unwrap_or(0);
                failed += num("failed").unwrap_or(0);
            }
        }
    }
    let status = child.wait()?;
    Ok((passed, failed, status.success()))
}

fn clean() -> anyhow::Result<()> {
    let removed = mesh_tests::clean_leftovers()?;
    if removed.is_empty() {
        println!("nothing to clean");
    }
    for r in removed {
        println!("removed {r}");
    }
    Ok(())
}
