//! `cargo xtask soak --minutes N`: mixed traffic on the mini cluster for a
//! bounded time, with one upgrade of each node's daemon in the middle.
//!
//! Traffic, all from the `client` pod on node-a:
//! - new connections, one HTTP request each, about 25/s to each of a
//!   proxy-mode service with a local endpoint, one across the mTLS tunnel
//!   and a kernel-mode one;
//! - long streams (20 s each, back to back; every 1 KiB round trip
//!   checked), local and through the tunnel;
//! - 4 MiB transfers through the tunnel, checksummed both ways;
//! - a `meshctl set-weight` every second.
//!
//! Halfway, node-a's daemon is replaced by the other build
//! (`mesh-daemon-variant`), then node-b's, each by a handover and a
//! SIGTERM to the old one. Every second the daemons' descriptors and
//! resident memory are sampled. The run fails on any failed request,
//! stream, transfer or write, and when a daemon's descriptors or memory
//! at the end (traffic stopped, 5 s to settle) are above where they were
//! once it was warm (descriptors +32, memory +25% and 16 MiB): growth
//! that does not come back.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use mesh_tests::sys::{fd_count, rss_kib};
use mesh_tests::{Cluster, ClusterSpec, Daemon};

fn say(s: &str) {
    println!("soak: {s}");
}

const LOCAL: &str = "10.96.0.30";
const REMOTE: &str = "10.96.0.31";
const KERNEL: &str = "10.96.0.32";

fn now_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

/// One second of the run.
#[derive(Default, Clone)]
struct Sample {
    /// (fds, RSS KiB) of node-a's and node-b's daemon.
    a: (usize, u64),
    b: (usize, u64),
    requests: u64,
    failed: u64,
}

/// What went wrong, each with when (seconds into the run).
type Failures = Arc<Mutex<Vec<String>>>;

pub fn soak(duration: Duration) -> anyhow::Result<()> {
    std::env::set_var("MESH_BIN_DIR", crate::root().join("target/debug"));
    let c = Cluster::create(&ClusterSpec::client_and_two_webs())?;
    for pod in ["web-1", "web-2"] {
        c.serve_with(pod, 8080, None, &["--echo-now", "9100"])?;
    }
    let variant = c.bins.daemon_variant.clone();
    if !variant.exists() {
        bail!("{}: the other build the soak upgrades to; cargo xtask soak builds it", variant.display());
    }
    let (w1, w2) = (c.pod("web-1").ip, c.pod("web-2").ip);
    let svc = |name: &str, vip: &str, mode: &str, eps: &str| {
        format!(
            "  - name: {name}\n    vip: {vip}\n    mode: {mode}\n    ports: [{{ port: 80, targetPort: 8080 }}, {{ port: 9100 }}]\n    endpoints: [{eps}]\n"
        )
    };
    let services = [
        svc("local", LOCAL, "proxy", &format!("{{ ip: {w1}, node: node-a }}")),
        svc("remote", REMOTE, "proxy", &format!("{{ ip: {w2}, node: node-b }}")),
        svc("kernel", KERNEL, "kernel", &format!("{{ ip: {w1}, node: node-a }}, {{ ip: {w2}, node: node-b }}")),
    ]
    .concat();
    let cfg = c.write_file("mesh.yaml", &c.config(&services))?;
    let flags = ["--drain-timeout", "60s"];
    let daemons =
        Arc::new(Mutex::new([c.start_daemon("node-a", &cfg, &flags)?, c.start_daemon("node-b", &cfg, &flags)?]));
    let secs = duration.as_secs();
    say(&format!("{secs} s of mixed traffic; node-a's and node-b's daemons are upgraded at {} s", secs / 2));

    let failures: Failures = Arc::default();
    let requests = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (t0, t0_ms) = (Instant::now(), now_ms());
    let fail = |what: String| failures.lock().unwrap().push(format!("{:>4} s  {what}", t0.elapsed().as_secs()));

    // New connections: one `mt-pod load` per service for the whole run,
    // each request's time and outcome read afterwards.
    let per_service = secs * 25;
    let loads: Vec<(&str, Child)> = [("local", LOCAL), ("remote", REMOTE), ("kernel", KERNEL)]
        .iter()
        .map(|(name, vip)| {
            let child =
                c.start("client", "mt-pod", &["load", &format!("{vip}:80"), &per_service.to_string(), "1", "38"]);
            child.map(|ch| (*name, ch))
        })
        .collect::<Result<_, _>>()?;

    std::thread::scope(|s| -> anyhow::Result<()> {
        // Long streams, local and through the tunnel, back to back.
        for (name, vip) in [("local", LOCAL), ("remote", REMOTE)] {
            let (c, stop, fail) = (&c, &stop, &fail);
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let child = c.start("client", "mt-pod", &["stream", &format!("{vip}:9100"), "20"]);
                    match child.and_then(|ch| Ok(ch.wait_with_output()?)) {
                        Ok(o) if o.status.success() => {}
                        Ok(o) => fail(format!("{name} stream: {}", String::from_utf8_lossy(&o.stdout).trim())),
                        Err(e) => fail(format!("{name} stream: {e}")),
                    }
                }
            });
        }
        // Transfers through the tunnel.
        {
            let (c, stop, fail, requests) = (&c, &stop, &fail, &requests);
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let out = c.exec(
                        "client",
                        "mt-pod",
                        &["bulk", &format!("{REMOTE}:9100"), "4194304", "2"],
                        Duration::from_secs(30),
                    );
                    requests.fetch_add(1, Ordering::Relaxed);
                    match out {
                        Ok(o) if o.status.success() => {
                            let text = String::from_utf8_lossy(&o.stdout);
                            let f =
                                |k: &str| text.split_whitespace().find_map(|w| w.strip_prefix(k)).map(str::to_owned);
                            if f("sent_sum=") != f("recv_sum=") || f("recv=").as_deref() != Some("4194304") {
                                fail(format!("4 MiB transfer changed: {}", text.trim()));
                            }
                        }
                        Ok(o) => fail(format!("4 MiB transfer: {}", String::from_utf8_lossy(&o.stdout).trim())),
                        Err(e) => fail(format!("4 MiB transfer: {e}")),
                    }
                }
            });
        }
        // A write a second.
        {
            let (c, stop, fail, requests) = (&c, &stop, &fail, &requests);
            let ip = w1.to_string();
            s.spawn(move || {
                let mut w = 1;
                while !stop.load(Ordering::Relaxed) {
                    w = w % 5 + 1;
                    requests.fetch_add(1, Ordering::Relaxed);
                    match c.meshctl("node-a", &["set-weight", "local", &ip, &w.to_string()]) {
                        Ok(o) if o.status.success() => {}
                        Ok(o) => fail(format!("meshctl set-weight: {}", String::from_utf8_lossy(&o.stderr).trim())),
                        Err(e) => fail(format!("meshctl set-weight: {e}")),
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            });
        }

        // Sampling, and the upgrades halfway.
        let mut samples: Vec<Sample> = Vec::new();
        let mut counted = 0;
        let mut warm: Option<[(usize, u64); 2]> = None;
        let mut upgraded = false;
        let mut old: Vec<Daemon> = Vec::new();
        let end = t0 + duration;
        while Instant::now() < end {
            let into = t0.elapsed().as_millis() % 1000;
            std::thread::sleep(Duration::from_millis(1000 - into as u64));
            let ds = daemons.lock().unwrap();
            let use_of = |d: &Daemon| (fd_count(d.pid()), rss_kib(d.pid()));
            samples.push(Sample {
                a: use_of(&ds[0]),
                b: use_of(&ds[1]),
                requests: requests.load(Ordering::Relaxed) - counted,
                failed: 0,
            });
            counted += samples.last().map_or(0, |s| s.requests);
            drop(ds);
            let at = t0.elapsed().as_secs();
            if !upgraded && at >= secs / 2 {
                upgraded = true;
                for (i, node) in ["node-a", "node-b"].iter().enumerate() {
                    say(&format!("{at} s: upgrading {node}'s daemon to the other build"));
                    let next = c.start_successor(node, &cfg, &flags, Some(&variant))?;
                    let prev = std::mem::replace(&mut daemons.lock().unwrap()[i], next);
                    prev.signal(15)?; // SIGTERM
                    old.push(prev);
                }
                // The new daemons' usage once warm is the baseline.
                warm = None;
            }
            if warm.is_none() && (at >= 10 && !upgraded || upgraded && at >= secs / 2 + 10) {
                let ds = daemons.lock().unwrap();
                warm = Some([
                    (fd_count(ds[0].pid()), rss_kib(ds[0].pid())),
                    (fd_count(ds[1].pid()), rss_kib(ds[1].pid())),
                ]);
            }
        }
        stop.store(true, Ordering::Relaxed);

        // The load clients end on their own; their per-request lines
        // give the failures per second.
        let mut per_second: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
        for (name, child) in loads {
            let out = child.wait_with_output().context("waiting for a load client")?;
            let text = String::from_utf8_lossy(&out.stdout);
            let start: u128 = text.lines().find_map(|l| l.strip_prefix("start=")?.parse().ok()).unwrap_or(t0_ms);
            for line in text.lines() {
                let mut w = line.split_whitespace();
                let (Some(at), Some(what)) = (w.next().and_then(|a| a.parse::<u128>().ok()), w.next()) else {
                    continue;
                };
                let sec = ((start + at).saturating_sub(t0_ms) / 1000) as u64;
                let e = per_second.entry(sec).or_default();
                e.0 += 1;
                if what == "FAIL" {
                    e.1 += 1;
                    failures.lock().unwrap().push(format!("{sec:>4} s  new connection to {name}: {line}"));
                }
            }
        }
        for (sec, (n, f)) in &per_second {
            if let Some(s) = samples.get_mut(*sec as usize) {
                s.requests += n;
                s.failed += f;
            }
        }
        // Old daemons drain and exit 0.
        for mut d in old {
            match d.wait_exit(Duration::from_secs(90)) {
                Ok(s) if s.success() => {}
                Ok(s) => fail(format!("an old daemon exited with {s}")),
                Err(e) => fail(format!("an old daemon: {e}")),
            }
        }
        std::thread::sleep(Duration::from_secs(5));
        let ds = daemons.lock().unwrap();
        let last = [(fd_count(ds[0].pid()), rss_kib(ds[0].pid())), (fd_count(ds[1].pid()), rss_kib(ds[1].pid()))];
        drop(ds);
        report(&samples, warm, last, &failures)
    })?;
    drop(daemons);
    Ok(())
}

fn report(
    samples: &[Sample],
    warm: Option<[(usize, u64); 2]>,
    last: [(usize, u64); 2],
    failures: &Failures,
) -> anyhow::Result<()> {
    let mut t = String::from("    s  node-a fds   RSS MiB  node-b fds   RSS MiB  requests  failed   (requests and failures since the row before)\n");
    let (mut window_requests, mut window_failed) = (0, 0);
    for (i, s) in samples.iter().enumerate() {
        window_requests += s.requests;
        window_failed += s.failed;
        if i % 10 == 9 || i + 1 == samples.len() || s.failed > 0 {
            let mib = |k: u64| k as f64 / 1024.0;
            let _ = writeln!(
                t,
                "{:>5}  {:>10}  {:>8.1}  {:>10}  {:>8.1}  {:>8}  {:>6}",
                i + 1,
                s.a.0,
                mib(s.a.1),
                s.b.0,
                mib(s.b.1),
                window_requests,
                window_failed
            );
            (window_requests, window_failed) = (0, 0);
        }
    }
    print!("{t}");
    let failures = failures.lock().unwrap();
    let total: u64 = samples.iter().map(|s| s.failed).sum();
    let mut problems: Vec<String> = failures.iter().take(20).cloned().collect();
    if failures.len() > 20 {
        problems.push(format!("... and {} more", failures.len() - 20));
    }
    match warm {
        Some(w) => {
            for (i, node) in ["node-a", "node-b"].iter().enumerate() {
                let (fds0, rss0) = w[i];
                let (fds1, rss1) = last[i];
                say(&format!(
                    "{node}: fds {fds0} warm -> {fds1} at the end; RSS {} -> {} MiB",
                    rss0 / 1024,
                    rss1 / 1024
                ));
                if fds1 > fds0 + 32 {
                    problems.push(format!("{node}: descriptors grew from {fds0} to {fds1} and did not come back"));
                }
                if rss1 > rss0 + rss0 / 4 + 16 * 1024 {
                    problems.push(format!("{node}: RSS grew from {rss0} to {rss1} KiB and did not come back"));
                }
            }
        }
        None => problems.push("the run was too short to see the daemons warm".to_owned()),
    }
    say(&format!("{} failed new connections; {} failures in all", total, failures.len()));
    if !problems.is_empty() {
        bail!("the soak failed:\n{}", problems.join("\n"));
    }
    say("no failed request, and no growth that stayed");
    Ok(())
}
