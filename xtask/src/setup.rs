//! What each xtask command needs on a fresh machine, installed only where
//! missing and silent when nothing is: the demo needs the toolchain parts
//! and a few base commands; the tests, the bench and fuzzing need the rest
//! (`cargo xtask setup` installs all of it).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

use crate::run;

/// Commands the demo's mini cluster runs, with the Debian package of each.
const DEMO_TOOLS: &[(&str, &str)] =
    &[("ip", "iproute2"), ("curl", "curl"), ("nsenter", "util-linux"), ("sysctl", "procps")];

/// Commands the tests and the bench run besides the demo's.
const TOOLS: &[(&str, &str)] = &[
    ("bpftool", "bpftool"),
    ("promtool", "prometheus"),
    ("prometheus", "prometheus"),
    ("wrk", "wrk"),
    ("iperf3", "iperf3"),
    ("haproxy", "haproxy"),
    ("nghttp", "nghttp2-client"),
    ("h2load", "nghttp2-client"),
];

const BPF_LINKER_VERSION: &str = "0.13.0";

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).status().map(|s| s.success()).unwrap_or(false)
}

fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
        || ["/usr/sbin", "/sbin"].iter().any(|d| Path::new(d).join(cmd).is_file())
}

/// What `cargo xtask demo` needs: the nightly's rust-src and bpf-linker to
/// build the kernel programs, the mini cluster's commands, and bpffs.
pub fn demo() -> anyhow::Result<()> {
    rust_src()?;
    bpf_linker()?;
    packages(DEMO_TOOLS)?;
    bpffs()
}

/// What the bench needs: the demo's, its load tools (oha, wrk, h2load,
/// iperf3) and the peer (HAProxy).
pub fn bench() -> anyhow::Result<()> {
    demo()?;
    oha()?;
    packages(TOOLS)
}

/// What `bench --instructions` needs: the daemon's build and valgrind.
pub fn instructions() -> anyhow::Result<()> {
    demo()?;
    packages(&[("valgrind", "valgrind")])
}

/// What fuzzing needs: cargo-fuzz (the targets build on the nightly).
pub fn fuzz() -> anyhow::Result<()> {
    rust_src()?;
    cargo_fuzz()
}

/// Everything: what `cargo xtask test` needs (its gates, every test, a
/// short fuzz and soak, the bench's quick run).
pub fn setup() -> anyhow::Result<()> {
    bench()?;
    cargo_deny()?;
    cargo_fuzz()?;
    docs()?;
    manifest_tools()
}

/// What `cargo xtask docs` needs besides the demo's build: mdBook.
pub fn docs() -> anyhow::Result<()> {
    demo()?;
    if cargo_bin("mdbook").is_some() {
        return Ok(());
    }
    let version = crate::docs::MDBOOK_VERSION;
    eprintln!("setup: building mdbook {version} (a few minutes, once)");
    run(crate::cargo().args([
        "install",
        "--locked",
        "mdbook",
        "--version",
        version,
        "--no-default-features",
        "--features",
        "search",
    ]))?;
    if cargo_bin("mdbook").is_none() {
        bail!("mdbook was installed but is not in ~/.cargo/bin or on PATH");
    }
    Ok(())
}

/// The Kubernetes schema validator the deploy/ tests run (from PyPI).
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

/// What checks deploy/ offline: kubectl (for `kubectl kustomize`) and
/// kubernetes-validate.
fn manifest_tools() -> anyhow::Result<()> {
    if !on_path("kubectl") {
        bail!("kubectl is missing; the deploy/ tests render the manifests with `kubectl kustomize`: install kubectl");
    }
    let validator = || {
        let mut c = Command::new("python3");
        c.args(["-m", "kubernetes_validate", "--version"]);
        c
    };
    if succeeds(&mut validator()) {
        return Ok(());
    }
    eprintln!("setup: installing {KUBERNETES_VALIDATE} from PyPI");
    run(Command::new("python3").args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        KUBERNETES_VALIDATE,
    ]))?;
    if !succeeds(&mut validator()) {
        bail!("kubernetes-validate was installed but `python3 -m kubernetes_validate` does not run");
    }
    Ok(())
}

/// cargo-deny, for the license and ban checks of `cargo xtask test`.
const CARGO_DENY_VERSION: &str = "0.20.2";

fn cargo_deny() -> anyhow::Result<()> {
    if succeeds(Command::new("cargo-deny").arg("--version")) {
        return Ok(());
    }
    eprintln!("setup: building cargo-deny {CARGO_DENY_VERSION} (takes a few minutes, once)");
    run(crate::cargo().args(["install", "--locked", "cargo-deny", "--version", CARGO_DENY_VERSION]))?;
    if !succeeds(Command::new("cargo-deny").arg("--version")) {
        bail!("cargo-deny was installed but does not run; is ~/.cargo/bin on PATH?");
    }
    Ok(())
}

/// oha, the bench's fixed-rate HTTP client (`-q`): not packaged by Debian.
const OHA_VERSION: &str = "1.10.0";

/// Where oha is: on PATH, else where `cargo install` put it.
pub fn oha_path() -> Option<std::path::PathBuf> {
    cargo_bin("oha")
}

/// A program on PATH, else where `cargo install` puts it.
pub fn cargo_bin(name: &str) -> Option<std::path::PathBuf> {
    if let Some(p) =
        std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|f| f.is_file()))
    {
        return Some(p);
    }
    Some(cargo_home()?.join("bin").join(name)).filter(|p| p.is_file())
}

/// Where `cargo install` puts what it builds: `$CARGO_HOME`, else `~/.cargo`.
fn cargo_home() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
}

const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// cargo-fuzz, for `cargo xtask fuzz` (a short run is part of the tests).
fn cargo_fuzz() -> anyhow::Result<()> {
    if cargo_bin("cargo-fuzz").is_some() {
        return Ok(());
    }
    eprintln!("setup: building cargo-fuzz {CARGO_FUZZ_VERSION} (about a minute, once)");
    run(crate::cargo().args(["install", "--locked", "cargo-fuzz", "--version", CARGO_FUZZ_VERSION]))?;
    if cargo_bin("cargo-fuzz").is_none() {
        bail!("cargo-fuzz was installed but is not in ~/.cargo/bin or on PATH");
    }
    Ok(())
}

fn oha() -> anyhow::Result<()> {
    if oha_path().is_some() {
        return Ok(());
    }
    eprintln!("setup: building oha {OHA_VERSION} (takes a few minutes, once)");
    run(crate::cargo().args(["install", "--locked", "oha", "--version", OHA_VERSION]))?;
    if oha_path().is_none() {
        bail!("oha was installed but is not in ~/.cargo/bin or on PATH");
    }
    Ok(())
}

fn rust_src() -> anyhow::Result<()> {
    let out = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .context("running rustup (is rustup installed?)")?;
    if !out.status.success() {
        bail!("the nightly toolchain is not installed; the kernel programs need it: rustup toolchain install nightly");
    }
    if !String::from_utf8_lossy(&out.stdout).lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: adding rust-src to the nightly toolchain");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    Ok(())
}

/// bpf-linker must link with the nightly's own LLVM: point LLVM_PREFIX at a
/// folder whose lib/ links to the nightly's libLLVM.
fn bpf_linker() -> anyhow::Result<()> {
    if succeeds(Command::new("bpf-linker").arg("--version")) {
        return Ok(());
    }
    let sysroot = Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]).output()?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    let lib = std::fs::read_dir(sysroot.join("lib"))
        .with_context(|| format!("reading {}/lib", sysroot.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}/lib", sysroot.display()))?;
    let major: String = lib["libLLVM.so.".len()..].chars().take_while(char::is_ascii_digit).collect();
    // bpf-linker finds libLLVM at run time through this prefix (its
    // runpath), so the prefix lives as long as the installed tool, not in
    // a checkout that `cargo clean` or a deleted clone would take with it.
    let prefix = cargo_home().context("neither CARGO_HOME nor HOME is set")?.join(format!("bpf-linker-llvm-{major}"));
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so", lib.as_str()] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(sysroot.join("lib").join(&lib), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {major} (takes a minute or two)"
    );
    // `--force`: an installed bpf-linker that does not run (its libLLVM
    // gone) is replaced, not kept as "already installed".
    run(crate::cargo()
        .args(["install", "--force", "bpf-linker", "--version", BPF_LINKER_VERSION, "--no-default-features"])
        .arg("--features")
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &prefix))?;
    match Command::new("bpf-linker").arg("--version").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => bail!(
            "bpf-linker was installed but does not run: {}(its libLLVM is linked from {})",
            String::from_utf8_lossy(&out.stderr),
            prefix_lib.display()
        ),
        Err(e) => bail!("bpf-linker was installed but does not run ({e}); is ~/.cargo/bin on PATH?"),
    }
    Ok(())
}

/// Installs the Debian packages of the `tools` not on PATH.
fn packages(tools: &[(&str, &str)]) -> anyhow::Result<()> {
    let mut missing: Vec<&str> = tools.iter().filter(|(c, _)| !on_path(c)).map(|(_, p)| *p).collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!("missing Debian packages {missing:?}; install them as root: apt-get install {}", missing.join(" "));
    }
    eprintln!("setup: installing {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn bpffs() -> anyhow::Result<()> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mounted =
        mountinfo.lines().any(|l| l.split_whitespace().nth(4) == Some("/sys/fs/bpf") && l.contains(" - bpf "));
    if mounted {
        return Ok(());
    }
    if !is_root() {
        bail!("bpffs is not mounted at /sys/fs/bpf; as root: mount -t bpf bpf /sys/fs/bpf");
    }
    eprintln!("setup: mounting bpffs at /sys/fs/bpf");
    std::fs::create_dir_all("/sys/fs/bpf")?;
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}
