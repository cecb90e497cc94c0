//! `cargo xtask fuzz`: runs every cargo-fuzz target of `fuzz/` (libFuzzer,
//! nightly) for a bounded time, each from its corpus (`fuzz/corpus/`,
//! kept between runs, seeded from `fuzz/seeds/`), and fails on the first
//! crash, naming its input and how to turn it into a regression test.
//!
//! Built without a sanitizer (`-s none`): the daemon is safe Rust but for
//! a few system calls; what the targets look for are panics, hangs and
//! broken invariants, and the build is twice as fast.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

/// Every target, with what it drives.
pub const TARGETS: [(&str, &str); 5] = [
    ("state_document", "the state document parser and validator"),
    ("api_request", "the control API's request handling (no kernel datapath)"),
    ("tunnel_connect", "the tunnel's HTTP/2 CONNECT handling after TLS"),
    ("kernel_structs", "decoding the kernel maps' entries"),
    ("handover_message", "the handover protocol's messages"),
];

fn fuzz_cmd(dir: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(dir).env_remove("CARGO").env_remove("RUSTUP_TOOLCHAIN").args(["+nightly", "fuzz"]);
    cmd
}

/// One line of libFuzzer's output: `#N DONE cov: C ft: F corp: K/S ...`.
fn summary(stderr: &str) -> Option<String> {
    let line = stderr.lines().rev().find(|l| l.contains(" DONE ") || l.contains(" cov: "))?;
    let field = |name: &str| line.split_whitespace().skip_while(|w| *w != name).nth(1).map(str::to_owned);
    let runs = line.split_whitespace().next()?.trim_start_matches('#').to_owned();
    Some(format!(
        "{runs:>10} runs  cov {:>6}  corpus {:>12}  exec/s {:>8}",
        field("cov:")?,
        field("corp:")?,
        field("exec/s:").unwrap_or_default()
    ))
}

/// The crash input libFuzzer wrote, from its output.
fn artifact(stderr: &str) -> Option<PathBuf> {
    stderr.lines().find_map(|l| l.split("Test unit written to ").nth(1)).map(|p| PathBuf::from(p.trim()))
}

pub fn fuzz(seconds: u64, only: &[String]) -> anyhow::Result<()> {
    let dir = crate::root().join("fuzz");
    for t in only {
        if !TARGETS.iter().any(|(n, _)| n == t) {
            let names: Vec<&str> = TARGETS.iter().map(|(n, _)| *n).collect();
            bail!("no fuzz target {t:?}; the targets are {}", names.join(", "));
        }
    }
    eprintln!("fuzz: building the targets (cargo +nightly fuzz build, no sanitizer)");
    crate::run(fuzz_cmd(&dir).args(["build", "-s", "none"]))?;
    let mut rows = Vec::new();
    for (target, what) in TARGETS.iter().filter(|(n, _)| only.is_empty() || only.iter().any(|o| o == n)) {
        let corpus = dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
        let seeds = dir.join("seeds").join(target);
        eprintln!("fuzz: {target} ({what}) for {seconds} s");
        let mut cmd = fuzz_cmd(&dir);
        cmd.args(["run", "-s", "none", target]).arg(&corpus);
        if seeds.is_dir() {
            cmd.arg(&seeds);
        }
        cmd.arg("--")
            .arg(format!("-max_total_time={seconds}"))
            // An input that takes a second is a hang.
            .arg("-timeout=10")
            .arg("-rss_limit_mb=2048")
            .arg("-print_final_stats=0")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let out = cmd.output().with_context(|| format!("running fuzz target {target}"))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        remove_scratch();
        if !out.status.success() {
            let tail: Vec<&str> = stderr.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            let input = artifact(&stderr).map_or("(no input written)".to_owned(), |p| p.display().to_string());
            bail!(
                "fuzz target {target} failed:\n{}\n\ninput: {input}\nreproduce: (cd fuzz && cargo +nightly fuzz run -s none {target} {input})\n\
                 fix it, then add the input as a regression test in mesh-daemon/src/fuzzing.rs",
                tail.join("\n")
            );
        }
        rows.push(format!("{target:<18} {}", summary(&stderr).unwrap_or_else(|| "(no summary)".to_owned())));
    }
    println!("fuzz: {} s per target, no crash", seconds);
    for r in rows {
        println!("  {r}");
    }
    Ok(())
}

/// The API target's state dirs (one per fuzzing process, under /dev/shm
/// or /tmp).
fn remove_scratch() {
    for base in ["/dev/shm", "/tmp"] {
        if let Ok(rd) = std::fs::read_dir(base) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with("mesh-fuzz-api-") {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzers_summary_and_crash_input() {
        let out =
            "INFO: Seed: 1\n#2415928\tDONE   cov: 2106 ft: 8014 corp: 2666/280Kb lim: 3480 exec/s: 115044 rss: 69Mb\n";
        let s = summary(out).unwrap();
        assert!(
            s.contains("2415928 runs") && s.contains("cov   2106") && s.contains("2666/280Kb") && s.contains("115044"),
            "{s}"
        );
        let crash = "==1== ERROR: libFuzzer: deadly signal\nartifact_prefix='/x/'; Test unit written to /x/crash-a8\n";
        assert_eq!(artifact(crash), Some(PathBuf::from("/x/crash-a8")));
        assert_eq!(artifact(out), None);
    }
}
