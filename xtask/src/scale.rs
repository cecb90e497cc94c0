//! `cargo xtask bench --scale`: what a cluster's size costs one node.
//!
//! One node, a client pod and ten backend pods; for 1 000 and 10 000
//! services of 10 endpoints each (`--quick`: 100 and 1 000), in proxy and
//! in kernel mode, with active checks off, each on a fresh daemon:
//!
//! - apply: `meshctl apply -f` of the whole state onto an empty daemon;
//! - change: one endpoint's weight (`meshctl set-weight`, timed around
//!   the meshctl process, and the daemon's own phases from its log), the median of
//!   20 (`--quick`: 3), and its ratio 10k/1k (the target is 1.5);
//! - the daemon's RSS per endpoint at rest (RSS after the changes and the
//!   idle period, less RSS before the apply, over services x endpoints;
//!   the target is 1 KiB);
//! - the kernel maps' memory (`bpftool map show`: bytes_memlock of
//!   SERVICES and SLOTS);
//! - idle CPU over 20 s (`--quick`: 2 s) after the changes;
//! - a `/metrics` scrape, the median of 5;
//! - and, as arithmetic (not measured), the active-check probes per second
//!   the node would send with the default check (tcp every 5 s) on every
//!   endpoint: distinct endpoint addresses over the interval.
//!
//! Written to `bench/results/scale.md` (`--quick`: `scale-quick.md`).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use mesh_tests::{Cluster, ClusterSpec, Daemon};

const BACKENDS: usize = 10;

/// One (mode, size) run's figures.
struct Row {
    mode: &'static str,
    services: usize,
    apply_s: f64,
    change_s: f64,
    /// The daemon's own time for one change: plan + sync + save + publish
    /// as its log says (the median over the changes).
    change_daemon_s: f64,
    rss_per_endpoint_b: f64,
    rss_mib: f64,
    kernel_maps_b: u64,
    idle_cpu_pct: f64,
    scrape_s: f64,
}

fn say(s: &str) {
    eprintln!("bench --scale: {s}");
}

fn vip(i: usize) -> String {
    format!("10.{}.{}.{}", 96 + i / 62_500, i / 250 % 250, i % 250 + 1)
}

/// `n` services of the ten backends in `mode`, checks off.
fn services(c: &Cluster, n: usize, mode: &str) -> String {
    let eps: Vec<String> =
        (0..BACKENDS).map(|b| format!("{{ ip: {}, node: node-a }}", c.pod(&format!("web-{b}")).ip)).collect();
    let eps = eps.join(", ");
    let mut out = String::with_capacity(n * 600);
    for i in 0..n {
        let _ = writeln!(
            out,
            "  - {{ name: s{i}, vip: {}, mode: {mode}, ports: [{{ port: 80, targetPort: 8080 }}], healthCheck: {{ protocol: none }}, endpoints: [{eps}] }}",
            vip(i)
        );
    }
    out
}

/// RSS of `pid`, KiB.
fn rss_kib(pid: u32) -> f64 {
    crate::bench::usage(pid).0 * 1024.0
}

/// CPU seconds of `pid` so far.
fn cpu_s(pid: u32) -> f64 {
    crate::bench::usage(pid).1
}

fn meshctl(c: &Cluster, args: &[&str]) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let out = c.meshctl("node-a", args)?;
    let took = t0.elapsed();
    if !out.status.success() {
        bail!("meshctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(took)
}

/// bytes_memlock of the pinned maps SERVICES and SLOTS of node-a.
fn kernel_maps(c: &Cluster) -> u64 {
    ["SERVICES", "SLOTS"]
        .iter()
        .filter_map(|m| {
            let path = c.node("node-a").pin_dir.join(m);
            mesh_tests::sys::bpftool(&["map", "show", "pinned", path.to_str()?]).ok()?["bytes_memlock"].as_u64()
        })
        .sum()
}

fn measure(n: usize, mode: &'static str, changes: usize, idle: Duration) -> anyhow::Result<Row> {
    let mut spec = ClusterSpec::new().node("node-a").pod("client", "node-a");
    for b in 0..BACKENDS {
        spec = spec.plain_pod(&format!("web-{b}"), "node-a");
    }
    let c = Cluster::create(&spec)?;
    let empty = c.write_file("mesh.yaml", &c.config("").replace("services:\n", "services: []\n"))?;
    let d: Daemon = c.start_daemon("node-a", &empty, &[])?;
    std::thread::sleep(Duration::from_millis(500));
    let rss_before = rss_kib(d.pid());
    let file = c.write_file("scale.yaml", &c.config(&services(&c, n, mode)))?;
    let apply = meshctl(&c, &["apply", "-f", file.to_str().context("path")?])?;
    // One endpoint's weight, on services spread over the state.
    let ip = c.pod("web-3").ip.to_string();
    let mut times = Vec::new();
    let step = (n - 1) / (changes - 1).max(1);
    for k in 0..changes {
        let svc = format!("s{}", k * step);
        let w = if k % 2 == 0 { "2" } else { "1" };
        times.push(meshctl(&c, &["set-weight", &svc, &ip, w])?.as_secs_f64());
    }
    // The daemon writes its log in batches: wait for the apply's and the
    // changes' lines.
    let logged = daemon_times(&d.log_with("state applied", changes + 1), changes);
    if logged.len() != changes {
        bail!("the daemon logged {} of {changes} changes (\"state applied\" lines)", logged.len());
    }
    let change_daemon_s = crate::bench::median(logged);
    let cpu0 = cpu_s(d.pid());
    std::thread::sleep(idle);
    let idle_cpu = (cpu_s(d.pid()) - cpu0) / idle.as_secs_f64() * 100.0;
    // At rest: after a write the daemon drops the state it replaced and
    // hands the freed heap back on a helper thread; the idle period lets
    // that finish, as it does between writes in a running cluster.
    let rss_after = rss_kib(d.pid());
    let mut scrapes = Vec::new();
    for _ in 0..5 {
        let t0 = Instant::now();
        let (status, _) = d.admin_get("/metrics")?;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        scrapes.push(t0.elapsed().as_secs_f64());
    }
    let endpoints = (n * BACKENDS) as f64;
    Ok(Row {
        mode,
        services: n,
        apply_s: apply.as_secs_f64(),
        change_s: crate::bench::median(times),
        change_daemon_s,
        rss_per_endpoint_b: (rss_after - rss_before) * 1024.0 / endpoints,
        rss_mib: rss_after / 1024.0,
        kernel_maps_b: kernel_maps(&c),
        idle_cpu_pct: idle_cpu,
        scrape_s: crate::bench::median(scrapes),
    })
}

/// The phase times (plan, sync, save, publish) of the last `n` writes in
/// a daemon's log, each summed, in seconds.
fn daemon_times(log: &str, n: usize) -> Vec<f64> {
    let phases = ["plan_ms=", "sync_ms=", "save_ms=", "publish_ms="];
    let mut out: Vec<f64> = log
        .lines()
        .filter(|l| l.contains("state applied"))
        .map(|l| {
            phases.iter().filter_map(|p| l.split(p).nth(1)?.split_whitespace().next()?.parse::<f64>().ok()).sum::<f64>()
                / 1000.0
        })
        .collect();
    out.drain(..out.len().saturating_sub(n));
    out
}

pub fn scale(quick: bool, release: bool) -> anyhow::Result<()> {
    mesh_tests::sys::require_root()?;
    crate::bench_bins(release, say)?;
    let (small, large) = if quick { (100, 1_000) } else { (1_000, 10_000) };
    let (changes, idle) = if quick { (3, Duration::from_secs(2)) } else { (20, Duration::from_secs(20)) };
    let mut rows = Vec::new();
    for mode in ["proxy", "kernel"] {
        for n in [small, large] {
            say(&format!("{n} services x {BACKENDS} endpoints, mode {mode}"));
            let r = measure(n, mode, changes, idle)?;
            say(&format!(
                "  apply {:.2} s, one change {:.1} ms, {:.0} B RSS per endpoint",
                r.apply_s,
                r.change_s * 1000.0,
                r.rss_per_endpoint_b
            ));
            rows.push(r);
        }
    }
    let text = render(&rows, quick, release, small, large);
    println!("{text}");
    let dir = crate::root().join("bench/results");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join(if quick { "scale-quick.md" } else { "scale.md" });
    std::fs::write(&file, &text)?;
    say(&format!("written to {}", file.display()));
    Ok(())
}

fn render(rows: &[Row], quick: bool, release: bool, small: usize, large: usize) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Scale{}\n\nOne node, {BACKENDS} endpoints per service, active checks off; `cargo xtask bench --scale{}{}`.\n",
        if quick { " (quick run, not for comparison)" } else { "" },
        if quick { " --quick" } else { "" },
        if release { "" } else { " --debug" }
    );
    let _ = writeln!(
        s,
        "| mode | services x endpoints | apply | one change (median, meshctl) | of it in the daemon | daemon RSS | RSS per endpoint | kernel maps | idle CPU | /metrics scrape |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} x {BACKENDS} | {:.2} s | {:.1} ms | {:.2} ms | {:.0} MiB | {:.0} B | {:.1} MiB | {:.1}% | {:.1} ms |",
            r.mode,
            r.services,
            r.apply_s,
            r.change_s * 1000.0,
            r.change_daemon_s * 1000.0,
            r.rss_mib,
            r.rss_per_endpoint_b,
            r.kernel_maps_b as f64 / 1048576.0,
            r.idle_cpu_pct,
            r.scrape_s * 1000.0
        );
    }
    let _ = writeln!(s, "\nRatios {large}/{small} (targets: one change at most 1.5; apply within 1 s at 10 000):\n");
    for mode in ["proxy", "kernel"] {
        let get = |n: usize| rows.iter().find(|r| r.mode == mode && r.services == n);
        if let (Some(a), Some(b)) = (get(small), get(large)) {
            let _ = writeln!(
                s,
                "- {mode}: apply {:.1}x, one change {:.2}x (in the daemon: {:.2}x)",
                b.apply_s / a.apply_s,
                b.change_s / a.change_s,
                b.change_daemon_s / a.change_daemon_s
            );
        }
    }
    // Not measured: what the default check (tcp every 5 s, one probe per
    // distinct endpoint address) would send.
    let _ = writeln!(
        s,
        "\nActive checks (arithmetic, not measured): with the default check (tcp every 5 s) on, a node probes each distinct endpoint address: {} probes/s here ({BACKENDS} addresses); at 10 000 services x 10 distinct endpoints, 20 000 probes/s per node. In Kubernetes mode checks are off unless a Service asks (`mesh.io/health-check`), so the default is 0.",
        BACKENDS / 5
    );
    s
}
