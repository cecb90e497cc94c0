//! `cargo xtask bench --instructions`: the instructions an HTTP/2 and an
//! HTTP/1.1 request cost, counted by callgrind on a fixed load in one
//! process (a client, the proxy, an endpoint; the daemon's tests
//! `a_fixed_load_for_callgrind` and `a_fixed_http1_load_for_callgrind`),
//! and an HTTP/2 request on a service with the bench's routes, and with
//! its policies (`a_fixed_routed_load_for_callgrind`,
//! `a_fixed_authorized_load_for_callgrind`).
//! callgrind counts the same for the same code and load whatever else
//! the machine runs, so a lever of a few hundred instructions per request
//! shows, where timed rounds on a shared machine cannot tell it from
//! noise (BENCHMARKS.md, tenth round).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};

use crate::{cargo, root};

/// The loads: their protocol and test.
const LOADS: [(&str, &str); 4] = [
    ("HTTP/2", "proxy::http::server::tests::a_fixed_load_for_callgrind"),
    ("HTTP/1.1", "proxy::http::server::tests::a_fixed_http1_load_for_callgrind"),
    ("routed HTTP/2 (50 routes x 16 rules)", "proxy::http::server::tests::a_fixed_routed_load_for_callgrind"),
    ("authorized HTTP/2 (20 policies x 10 rules)", "proxy::http::server::tests::a_fixed_authorized_load_for_callgrind"),
];
/// Two loads: their difference leaves out what the process costs once
/// (start, connections, the runtime).
const FEW: u64 = 1000;
const MANY: u64 = 5000;

pub fn instructions() -> anyhow::Result<()> {
    let binary = build()?;
    for (protocol, test) in LOADS {
        eprintln!(
            "bench: counting {protocol} instructions for {FEW} and {MANY} requests under callgrind (about a minute)"
        );
        let few = count(&binary, test, FEW)?;
        let many = count(&binary, test, MANY)?;
        let per = per_request(few, many)?;
        println!(
            "instructions per {protocol} request (client, proxy and endpoint in one process): {per} \
             ({few} for {FEW} requests, {many} for {MANY})"
        );
    }
    Ok(())
}

/// The daemon's library tests in a release build of their own. Without
/// fat LTO (the daemon's release profile): minutes shorter, and the counts
/// compare builds made the same way.
fn build() -> anyhow::Result<PathBuf> {
    eprintln!("bench: building the daemon's library tests (release, without LTO)");
    let out = cargo()
        .args(["test", "--release", "-p", "mesh-daemon", "--lib", "--no-run", "--message-format=json"])
        .env("CARGO_PROFILE_RELEASE_LTO", "off")
        .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "16")
        .env("CARGO_TARGET_DIR", root().join("target/instructions"))
        .current_dir(root())
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the daemon's library tests failed ({})", out.status);
    }
    test_binary(&String::from_utf8_lossy(&out.stdout))
        .context("cargo named no test binary of mesh-daemon's library (--message-format=json)")
}

/// The test binary of mesh-daemon's library, from cargo's JSON messages.
fn test_binary(messages: &str) -> Option<PathBuf> {
    messages.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).find_map(|m| {
        let lib = m["target"]["kind"].as_array()?.iter().any(|k| k == "lib");
        let ours = m["target"]["name"] == "mesh_daemon" && lib && m["profile"]["test"] == true;
        ours.then(|| m["executable"].as_str().map(PathBuf::from))?
    })
}

/// The instructions callgrind counted for `requests` requests.
fn count(binary: &PathBuf, test: &str, requests: u64) -> anyhow::Result<u64> {
    let out_file = std::env::temp_dir().join(format!("mesh-callgrind-{}-{requests}.out", std::process::id()));
    let out = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out_file.display()))
        .arg(binary)
        .args(["--exact", "--test-threads", "1", test])
        .env("MESH_LOAD_REQUESTS", requests.to_string())
        .output()
        .context("running valgrind (Debian package valgrind)")?;
    let _ = std::fs::remove_file(&out_file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("the load under callgrind failed ({}): {stderr}", out.status);
    }
    collected(&stderr).with_context(|| format!("no 'Collected' line in callgrind's output: {stderr}"))
}

/// callgrind's closing `==<pid>== Collected : <n>`.
fn collected(stderr: &str) -> Option<u64> {
    stderr.lines().find_map(|l| l.split("Collected :").nth(1)?.trim().parse().ok())
}

fn per_request(few: u64, many: u64) -> anyhow::Result<u64> {
    match many.checked_sub(few) {
        Some(d) if d > 0 => Ok(d / (MANY - FEW)),
        _ => bail!("{MANY} requests counted no more than {FEW} ({many} against {few})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_callgrind_and_cargo_output() {
        let err = "==29705== Events    : Ir\n==29705== Collected : 103124042\n==29705==\n";
        assert_eq!(collected(err), Some(103_124_042));
        assert_eq!(collected("==1== I   refs: 5\n"), None);
        assert_eq!(per_request(103_124_042, 506_503_680).unwrap(), 100_844);
        assert!(per_request(5, 5).is_err());

        let msgs = concat!(
            r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"mesh_daemon"},"profile":{"test":false},"executable":null}"#,
            "\n",
            r#"{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"mesh-daemon"},"profile":{"test":true},"executable":"/t/bin"}"#,
            "\n",
            r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"mesh_daemon"},"profile":{"test":true},"executable":"/t/lib"}"#,
        );
        assert_eq!(test_binary(msgs), Some(PathBuf::from("/t/lib")));
    }
}
