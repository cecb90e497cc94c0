//! `cargo xtask bench`: the same load, in one run, through seven paths, on
//! a two-node mini cluster, each reported as ratios to its baseline and to
//! its peer (what a user would run instead).
//!
//! On the client's node (baseline `direct`, peer `haproxy`):
//! - direct: client pod to the backend pod's IP;
//! - kernel: the VIP in `mode: kernel` (connect4 picks the backend);
//! - proxy-local: the VIP in `mode: proxy`, backend on the same node;
//! - haproxy: HAProxy in TCP mode, one thread, on the client's node.
//!
//! Across the nodes (baseline `direct-remote`, peer `haproxy-mtls`):
//! - direct-remote: client pod to the pod on the other node;
//! - proxy-mtls: the VIP in `mode: proxy`, backend on the other node
//!   (through the mTLS tunnel);
//! - haproxy-mtls: HAProxy on each node, one thread each, TLS 1.3 with
//!   client certificates from the same kind of CA between them.
//!
//! The mesh daemons get one worker thread, like HAProxy. Per path: wrk with
//! 32 keep-alive connections (requests/s, p50, p99), wrk with a new
//! connection per request (connections/s), iperf3 (Gbit/s), the RSS of the
//! client node's proxy, the CPU seconds of the proxies at both ends, and
//! their CPU seconds per GB that iperf3 moved.
//!
//! Requests (a second table), to an HTTP/1.1 + h2c backend (mt-http):
//! - http-direct: client pod to the backend pod;
//! - http-proxy-local / http-proxy-mtls: the VIP with `appProtocol: http`
//!   (wrk) or `http2` (h2load), every request routed on its own;
//! - haproxy-http: HAProxy in `mode http` (h2 on the h2load port), one
//!   thread, on the client's node, with `option httplog` to its log file,
//!   as the mesh writes an access-log line per request;
//! - http-proxy-nolog / haproxy-http-nolog: the same two with no access
//!   log on either side (`accessLog: off`; no `log` in HAProxy);
//! - http-proxy-routes: as http-proxy-local, through a Service with 50
//!   HTTPRoutes of 16 rules each (800 PathPrefix and header matches that
//!   no bench request matches, ranked before its catch-all), the cost of
//!   routing against http-proxy-local in the same run.
//! - http-proxy-authz: as http-proxy-local, through a Service with 20
//!   authorization policies of 10 rules each applying to it (19 DENY
//!   policies whose rules no bench request matches, and an ALLOW policy
//!   whose last rule lets the client through), the cost of authorization
//!   against http-proxy-local in the same run.
//!
//! Per path: wrk, 32 HTTP/1.1 keep-alive connections (requests/s, p50,
//! p99); h2load, 4 HTTP/2 connections of 32 streams each (requests/s);
//! oha at a fixed 1000 requests/s over 8 keep-alive connections (p50,
//! p99, with latency correction); the proxies' CPU microseconds per
//! request during wrk and during h2load, and their CPU seconds over all;
//! and a verdict per row against its target (see [`requests`]).
//!
//! A full run writes `bench/results/latest.md` and the same summary
//! paragraph into the README ([`headline`]); `cargo xtask test` fails
//! when the README's figures are not latest.md's.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use mesh_tests::{Cluster, ClusterSpec};

pub mod headline;
pub mod instructions;
mod requests;
use mesh_tests::fixtures::{bench_policies, bench_routes};

struct Row {
    name: &'static str,
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    conns: f64,
    gbps: f64,
    rss_mib: f64,
    cpu_s: f64,
    /// The proxies' CPU seconds (both ends) per GB iperf3 moved.
    cpu_per_gb: f64,
    /// The whole machine's CPU seconds (every process, the kernel's
    /// network work included) per GB iperf3 moved.
    machine_per_gb: f64,
    /// The share of all CPUs busy during iperf3, in percent.
    machine_busy: f64,
}

/// The row a path is divided by, and the row of what a user would run
/// instead: cross-node paths against cross-node ones.
fn baseline_and_peer(name: &str) -> (&'static str, &'static str) {
    match name {
        "direct-remote" | "proxy-mtls" | "haproxy-mtls" => ("direct-remote", "haproxy-mtls"),
        "direct-v6" | "kernel-v6" | "proxy-local-v6" | "haproxy-v6" => ("direct-v6", "haproxy-v6"),
        _ => ("direct", "haproxy"),
    }
}

/// Busy and idle CPU seconds of the whole machine so far, all CPUs
/// (`/proc/stat`; iowait counts as idle).
fn machine_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> =
        stat.lines().next().unwrap_or_default().split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let idle = f.get(3).copied().unwrap_or(0.0) + f.get(4).copied().unwrap_or(0.0);
    ((f.iter().sum::<f64>() - idle) / 100.0, idle / 100.0)
}

/// CPU seconds of several processes, summed.
fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().map(|p| usage(*p).1).sum()
}

fn say(s: &str) {
    println!("bench: {s}");
}

/// Microseconds from wrk's `123.45us`, `1.20ms`, `1.00s`.
fn micros(v: &str) -> Option<f64> {
    let (num, mult) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1000.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1_000_000.0)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|x| x * mult)
}

/// (requests/s, p50 µs, p99 µs) from wrk's output with `--latency`.
fn parse_wrk(out: &str) -> Option<(f64, f64, f64)> {
    let rps = out.lines().find_map(|l| l.trim().strip_prefix("Requests/sec:")?.trim().parse().ok())?;
    let pct = |p: &str| {
        out.lines().find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == p).then(|| micros(w.next()?)).flatten()
        })
    };
    Some((rps, pct("50%").unwrap_or(0.0), pct("99%").unwrap_or(0.0)))
}

/// (RSS MiB, CPU seconds) of a process.
pub(crate) fn usage(pid: u32) -> (f64, f64) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| {
                    l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
                })
                .flatten()
        })
        .unwrap_or(0.0)
        / 1024.0;
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
        })
        .unwrap_or(0.0);
    (rss, cpu)
}

pub fn bench(
    quick: bool,
    only: &[String],
    seconds: Option<u64>,
    rounds: Option<usize>,
    release: bool,
) -> anyhow::Result<()> {
    mesh_tests::sys::require_root()?;
    const PATHS: [&str; 19] = [
        "direct",
        "kernel",
        "proxy-local",
        "haproxy",
        "direct-v6",
        "kernel-v6",
        "proxy-local-v6",
        "haproxy-v6",
        "direct-remote",
        "proxy-mtls",
        "haproxy-mtls",
        "http-direct",
        "http-proxy-local",
        "http-proxy-mtls",
        "haproxy-http",
        "http-proxy-nolog",
        "haproxy-http-nolog",
        "http-proxy-routes",
        "http-proxy-authz",
    ];
    if let Some(bad) = only.iter().find(|o| !PATHS.contains(&o.as_str())) {
        bail!("--only {bad}: no such path; the paths are {}", PATHS.join(", "));
    }
    let secs: u64 = seconds.unwrap_or(if quick { 1 } else { 5 }).max(1);
    let rounds = rounds.unwrap_or(if quick { 1 } else { 3 }).max(1);
    crate::bench_bins(release, say)?;

    say("building the mini cluster, dual-stack: node-a (client, web-1), node-b (web-2)");
    let c = Cluster::create(&ClusterSpec::client_and_two_webs().stack(mesh_tests::Stack::Dual))?;
    for pod in ["web-1", "web-2"] {
        c.serve(pod, 8080, None)?;
        c.spawn(pod, std::path::Path::new("iperf3"), &["-s", "-p", "5201"])?;
        c.serve_http(pod, 8090, &[])?;
    }
    let (w1, w2) = (c.pod("web-1").ip, c.pod("web-2").ip);
    let (w1_6, node_a6) = (c.pod("web-1").ip6.context("web-1's IPv6")?, c.node("node-a").address6.context("IPv6")?);
    let svc = |name: &str, vip: &str, mode: &str, ip: std::net::IpAddr, node: &str| {
        format!("  - name: {name}\n    vip: '{vip}'\n    mode: {mode}\n    ports: [{{ port: 80, targetPort: 8080 }}, {{ port: 5201 }}]\n    endpoints: [{{ ip: '{ip}', node: {node} }}]\n")
    };
    let http_svc = |name: &str, vip: &str, app: &str, ip: std::net::Ipv4Addr, node: &str| {
        format!("  - name: {name}\n    vip: {vip}\n    ports: [{{ port: 80, targetPort: 8090, appProtocol: {app} }}]\n    endpoints: [{{ ip: {ip}, node: {node} }}]\n")
    };
    let no_log = |svc: String| svc + "    accessLog: 'off'\n";
    let services = [
        svc("kernel", "10.96.0.20", "kernel", w1.into(), "node-a"),
        svc("local", "10.96.0.21", "proxy", w1.into(), "node-a"),
        svc("mtls", "10.96.0.22", "proxy", w2.into(), "node-b"),
        svc("kernel-v6", "fd00:96::20", "kernel", w1_6.into(), "node-a"),
        svc("local-v6", "fd00:96::21", "proxy", w1_6.into(), "node-a"),
        http_svc("http-local", "10.96.0.23", "http", w1, "node-a"),
        http_svc("h2-local", "10.96.0.24", "http2", w1, "node-a"),
        http_svc("http-mtls", "10.96.0.25", "http", w2, "node-b"),
        http_svc("h2-mtls", "10.96.0.26", "http2", w2, "node-b"),
        http_svc("http-routes", "10.96.0.27", "http", w1, "node-a"),
        http_svc("h2-routes", "10.96.0.28", "http2", w1, "node-a"),
        http_svc("http-authz", "10.96.0.29", "http", w1, "node-a"),
        http_svc("h2-authz", "10.96.0.30", "http2", w1, "node-a"),
        no_log(http_svc("http-nolog", "10.96.0.31", "http", w1, "node-a")),
        no_log(http_svc("h2-nolog", "10.96.0.32", "http2", w1, "node-a")),
    ]
    .concat();
    let cfg = c.write_file(
        "mesh.yaml",
        &(c.config(&services)
            + &bench_routes(&[("http-routes", "http-local"), ("h2-routes", "h2-local")])
            + &bench_policies(&["http-authz", "h2-authz"])),
    )?;
    let da = c.start_daemon("node-a", &cfg, &["--worker-threads", "1"])?;
    let db = c.start_daemon("node-b", &cfg, &["--worker-threads", "1"])?;

    let (node_a, node_b) = (c.node("node-a").address, c.node("node-b").address);
    // HAProxy with mutual TLS 1.3 between the nodes: certificates from a CA
    // of this run, as the mesh's are; each side verifies the other.
    let ca = c.ca_dir()?;
    let pem = |node: &str| -> anyhow::Result<String> {
        let dir = c.issue_cert(
            &ca,
            &format!("spiffe://cluster.local/ns/mesh-system/node/haproxy-{node}"),
            86400,
            &format!("haproxy-{node}"),
        )?;
        let mut both = std::fs::read_to_string(dir.join("cert.pem"))?;
        both.push_str(&std::fs::read_to_string(dir.join("key.pem"))?);
        let path = c.write_file(&format!("haproxy-{node}.pem"), &both)?;
        Ok(path.display().to_string())
    };
    let (pem_a, pem_b, ca_pem) = (pem("a")?, pem("b")?, ca.join("ca.pem").display().to_string());
    let tls = format!("ca-file {ca_pem} verify required ssl-min-ver TLSv1.3");
    let haproxy_cfg = format!(
        "global\n  nbthread 1\n  maxconn 8000\n  log stdout format raw local0\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
         listen http\n  bind {node_a}:18080\n  server web {w1}:8080\nlisten iperf\n  bind {node_a}:15201\n  server web {w1}:5201\n\
         listen http6\n  bind {node_a6}:18082\n  server web {w1_6}:8080\nlisten iperf6\n  bind {node_a6}:15202\n  server web {w1_6}:5201\n\
         listen h1\n  mode http\n  log global\n  option httplog\n  bind {node_a}:18090\n  server web {w1}:8090\n\
         listen h2\n  mode http\n  log global\n  option httplog\n  bind {node_a}:18091 proto h2\n  server web {w1}:8090 proto h2\n\
         listen h1-nolog\n  mode http\n  bind {node_a}:18092\n  server web {w1}:8090\n\
         listen h2-nolog\n  mode http\n  bind {node_a}:18093 proto h2\n  server web {w1}:8090 proto h2\n\
         listen mtls-http\n  bind {node_a}:18443\n  server b {node_b}:18444 ssl crt {pem_a} {tls}\n\
         listen mtls-iperf\n  bind {node_a}:15443\n  server b {node_b}:15444 ssl crt {pem_a} {tls}\n"
    );
    let haproxy_b_cfg = format!(
        "global\n  nbthread 1\n  maxconn 8000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
         listen mtls-http\n  bind {node_b}:18444 ssl crt {pem_b} {tls}\n  server web {w2}:8080\n\
         listen mtls-iperf\n  bind {node_b}:15444 ssl crt {pem_b} {tls}\n  server web {w2}:5201\n"
    );
    let hcfg = c.write_file("haproxy.cfg", &haproxy_cfg)?;
    let haproxy = c.spawn_on_node("node-a", "haproxy", &["-db", "-f", hcfg.to_str().context("path")?])?;
    let hcfg_b = c.write_file("haproxy-b.cfg", &haproxy_b_cfg)?;
    let haproxy_b = c.spawn_on_node("node-b", "haproxy", &["-db", "-f", hcfg_b.to_str().context("path")?])?;
    for (node, addr) in [
        ("node-a", std::net::SocketAddr::from((node_a, 18080))),
        ("node-b", std::net::SocketAddr::from((node_b, 18444))),
    ] {
        if !mesh_tests::sys::wait_until(Duration::from_secs(5), || {
            mesh_tests::sys::can_connect(&c.node(node).netns, addr)
        }) {
            let log = std::fs::read_to_string(c.dir.join(format!("node-{node}.log"))).unwrap_or_default();
            bail!("HAProxy does not accept on {addr}:\n{log}");
        }
    }

    let (a, b) = (da.pid(), db.pid());
    let scenarios: [(&str, String, String, Vec<u32>); 11] = [
        ("direct", format!("{w1}:8080"), format!("{w1}:5201"), vec![a]),
        ("kernel", "10.96.0.20:80".into(), "10.96.0.20:5201".into(), vec![a]),
        ("proxy-local", "10.96.0.21:80".into(), "10.96.0.21:5201".into(), vec![a]),
        ("haproxy", format!("{node_a}:18080"), format!("{node_a}:15201"), vec![haproxy]),
        ("direct-v6", format!("[{w1_6}]:8080"), format!("[{w1_6}]:5201"), vec![a]),
        ("kernel-v6", "[fd00:96::20]:80".into(), "[fd00:96::20]:5201".into(), vec![a]),
        ("proxy-local-v6", "[fd00:96::21]:80".into(), "[fd00:96::21]:5201".into(), vec![a]),
        ("haproxy-v6", format!("[{node_a6}]:18082"), format!("[{node_a6}]:15202"), vec![haproxy]),
        ("direct-remote", format!("{w2}:8080"), format!("{w2}:5201"), vec![a, b]),
        ("proxy-mtls", "10.96.0.22:80".into(), "10.96.0.22:5201".into(), vec![a, b]),
        ("haproxy-mtls", format!("{node_a}:18443"), format!("{node_a}:15443"), vec![haproxy, haproxy_b]),
    ];
    // Memory with many connections open: idle ones through proxy-local,
    // measured first, before the new-connection runs fill the node's
    // ephemeral ports with TIME_WAIT.
    const HELD: u64 = 1000;
    say(&format!("mesh-daemon RSS with {HELD} connections open through proxy-local"));
    let (rss_idle, _) = usage(da.pid());
    let mut holder = c.start("client", "mt-pod", &["hold", "10.96.0.21:80", &HELD.to_string(), "60"])?;
    // Until all are open, or the count stops growing for two seconds.
    let (mut last, mut still) = (0, 0);
    while still < 20 {
        std::thread::sleep(Duration::from_millis(100));
        let now = da.counter("proxy", "active").unwrap_or(0);
        if now >= HELD {
            break;
        }
        still = if now == last { still + 1 } else { 0 };
        last = now;
    }
    let active = da.counter("proxy", "active").unwrap_or(0);
    let (rss_held, _) = usage(da.pid());
    let _ = holder.kill();
    let _ = holder.wait();
    if active == 0 {
        bail!("no connection could be held open through proxy-local: {}", da.stats()?);
    }
    say(&format!("  RSS {rss_idle:.1} MiB idle, {rss_held:.1} MiB with {active} of {HELD} connections open"));
    let wait = Duration::from_secs(secs + 30);
    let selected: Vec<_> = scenarios.iter().filter(|s| only.is_empty() || only.iter().any(|o| o == s.0)).collect();
    // Rounds interleave the paths, so that a slow spell of the machine
    // hits every path alike, and each round starts one path later, so that
    // no path always follows the same one (the new-connection runs leave
    // TIME_WAIT sockets behind). Each figure is the median over the rounds.
    let mut runs: Vec<Vec<Row>> = selected.iter().map(|_| Vec::new()).collect();
    let mut socket_errors = Vec::new();
    for round in 1..=rounds {
        let n = selected.len();
        for i in (0..n).map(|k| (k + round - 1) % n) {
            let (name, http, tcp, pids) = selected[i];
            say(&format!(
                "{name} (round {round} of {rounds}): keep-alive, new connections, throughput ({secs} s each)"
            ));
            let cpu0 = cpu_of(pids);
            let d = format!("{secs}s");
            let url = format!("http://{http}/");
            let ka = c.exec("client", "wrk", &["-t1", "-c32", "-d", &d, "--latency", &url], wait)?;
            let ka = String::from_utf8_lossy(&ka.stdout).into_owned();
            let (rps, p50, p99) = parse_wrk(&ka).with_context(|| format!("{name}: no wrk result:\n{ka}"))?;
            let nc = c.exec("client", "wrk", &["-t1", "-c32", "-d", &d, "-H", "Connection: close", &url], wait)?;
            let nc = String::from_utf8_lossy(&nc.stdout).into_owned();
            let (conns, _, _) = parse_wrk(&nc).with_context(|| format!("{name}: no wrk result:\n{nc}"))?;
            for out in [&ka, &nc] {
                if let Some(e) = out.lines().find(|l| l.trim_start().starts_with("Socket errors:")) {
                    socket_errors.push(format!("{name}, round {round}: {}", e.trim()));
                }
            }
            let (host, port) = tcp.rsplit_once(':').context("address")?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let cpu_before_iperf = cpu_of(pids);
            let machine_before = machine_cpu();
            let ip = c.exec("client", "iperf3", &["-c", host, "-p", port, "-t", &secs.to_string(), "-J"], wait)?;
            let cpu_iperf = cpu_of(pids) - cpu_before_iperf;
            let machine_after = machine_cpu();
            let (busy, idle) = (machine_after.0 - machine_before.0, machine_after.1 - machine_before.1);
            let ip: serde_json::Value =
                serde_json::from_slice(&ip.stdout).with_context(|| format!("{name}: iperf3 output"))?;
            let gbps = ip["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .with_context(|| format!("{name}: iperf3: {ip}"))?
                / 1e9;
            let gb = ip["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0) / 1e9;
            let (rss, _) = usage(pids[0]);
            let per_gb = |cpu: f64| if gb > 0.0 { cpu / gb } else { 0.0 };
            let row = Row {
                name,
                rps,
                p50_us: p50,
                p99_us: p99,
                conns,
                gbps,
                rss_mib: rss,
                cpu_s: cpu_of(pids) - cpu0,
                cpu_per_gb: per_gb(cpu_iperf),
                machine_per_gb: per_gb(busy),
                machine_busy: if busy + idle > 0.0 { busy / (busy + idle) * 100.0 } else { 0.0 },
            };
            say(&format!(
                "  {:.0} req/s, p50 {:.0} us, p99 {:.0} us, {:.0} conn/s, {:.2} Gbit/s, RSS {:.1} MiB, CPU {:.2} s, {:.2} CPU s/GB, machine {:.2} CPU s/GB ({:.0}% busy)",
                row.rps, row.p50_us, row.p99_us, row.conns, row.gbps, row.rss_mib, row.cpu_s, row.cpu_per_gb, row.machine_per_gb, row.machine_busy
            ));
            if row.rps <= 0.0 || row.conns <= 0.0 || row.gbps <= 0.0 {
                bail!("{name}: a measurement produced no number");
            }
            runs[i].push(row);
        }
    }
    let rows: Vec<Row> = runs.iter().map(|r| median_row(r)).collect();

    // Requests: the same rounds, interleaved the same way.
    let h = |port: u16| format!("{node_a}:{port}");
    let http_paths = [
        requests::Path::new("http-direct", format!("{w1}:8090"), format!("{w1}:8090"), vec![]),
        requests::Path::new("http-proxy-local", "10.96.0.23:80", "10.96.0.24:80", vec![a]),
        requests::Path::new("http-proxy-nolog", "10.96.0.31:80", "10.96.0.32:80", vec![a]),
        requests::Path::new("haproxy-http", h(18090), h(18091), vec![haproxy]),
        requests::Path::new("haproxy-http-nolog", h(18092), h(18093), vec![haproxy]),
        requests::Path::new("http-proxy-mtls", "10.96.0.25:80", "10.96.0.26:80", vec![a, b]),
        requests::Path::new("http-proxy-routes", "10.96.0.27:80", "10.96.0.28:80", vec![a]),
        requests::Path::new("http-proxy-authz", "10.96.0.29:80", "10.96.0.30:80", vec![a]),
    ];
    let http_selected: Vec<_> =
        http_paths.iter().filter(|p| only.is_empty() || only.iter().any(|o| o == p.name)).collect();
    let http_rows = requests::measure(&c, &http_selected, secs, rounds, &mut socket_errors)?;

    // Only a full run of every path replaces the committed results.
    let full = !quick && release && only.is_empty() && seconds.is_none() && rounds >= 3;
    let mut flags = String::from(if quick { " --quick" } else { "" });
    if !release {
        flags.push_str(" --debug");
    }
    if !only.is_empty() {
        let _ = write!(flags, " --only {}", only.join(","));
    }
    if let Some(n) = seconds {
        let _ = write!(flags, " --seconds {n}");
    }
    if !quick && rounds != 3 {
        let _ = write!(flags, " --rounds {rounds}");
    }
    let mut table = render(&rows, secs, rounds, full, &flags);
    // A full run's summary, first after the table's introduction; the
    // README quotes it.
    let block = headline::block(&headline::paragraph(&rows, &http_rows, active, rss_held));
    if let Some(at) = table.find("\n| path |").filter(|_| full) {
        table.insert_str(at, &format!("\n{block}\n"));
    }
    if !http_rows.is_empty() {
        table.push_str(&requests::render_http(&http_rows));
    }
    if !socket_errors.is_empty() {
        let _ = writeln!(table, "\nwrk reported socket errors (the figures above include them):");
        for e in &socket_errors {
            let _ = writeln!(table, "- {e}");
        }
    }
    let _ = writeln!(
        table,
        "\nmesh-daemon RSS with {active} idle connections open through proxy-local (of {HELD} opened): {rss_held:.1} MiB ({rss_idle:.1} MiB before; target: under 30 MiB at 1000)."
    );
    println!("{table}");
    let dir = crate::root().join("bench/results");
    std::fs::create_dir_all(&dir)?;
    let file: PathBuf = dir.join(if full { "latest.md" } else { "quick.md" });
    std::fs::write(&file, &table)?;
    say(&format!("written to {}", file.display()));
    if full {
        headline::update_readme(&crate::root(), &block)?;
        say("README.md's figures updated from it");
    }
    Ok(())
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Each figure's median over the rounds.
fn median_row(runs: &[Row]) -> Row {
    let med = |f: fn(&Row) -> f64| median(runs.iter().map(f).collect());
    Row {
        name: runs[0].name,
        rps: med(|r| r.rps),
        p50_us: med(|r| r.p50_us),
        p99_us: med(|r| r.p99_us),
        conns: med(|r| r.conns),
        gbps: med(|r| r.gbps),
        rss_mib: med(|r| r.rss_mib),
        cpu_s: med(|r| r.cpu_s),
        cpu_per_gb: med(|r| r.cpu_per_gb),
        machine_per_gb: med(|r| r.machine_per_gb),
        machine_busy: med(|r| r.machine_busy),
    }
}

fn render(rows: &[Row], secs: u64, rounds: usize, full: bool, flags: &str) -> String {
    let base = |f: fn(&Row) -> f64, name: &str| rows.iter().find(|r| r.name == name).map(f).unwrap_or(0.0);
    // "0.50x direct": `r`'s figure over row `of`'s.
    let ratio = |r: &Row, f: fn(&Row) -> f64, of: &str| {
        let b = base(f, of);
        let x = if b > 0.0 { format!("{:.2}", f(r) / b) } else { "-".into() };
        format!("{x}x {of}")
    };
    let cell = |r: &Row, f: fn(&Row) -> f64, digits: usize| {
        let (baseline, peer) = baseline_and_peer(r.name);
        format!("{:.*} ({}, {})", digits, f(r), ratio(r, f, baseline), ratio(r, f, peer))
    };
    let mut s = String::new();
    let _ =
        writeln!(s, "# Benchmark results{}\n", if full { "" } else { " (quick or partial run, not for comparison)" });
    let _ = writeln!(
        s,
        "Made by `cargo xtask bench{}` on {} ({} CPUs), {} s per measurement, each figure the median of {} rounds. See BENCHMARKS.md for the method.\n",
        flags,
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|k| format!("Linux {}", k.trim()))
            .unwrap_or_default(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        secs,
        rounds
    );
    let _ = writeln!(
        s,
        "| path | keep-alive req/s | p50 µs | p99 µs | new conn/s | Gbit/s | proxy RSS MiB | proxy CPU s | CPU s per GB | machine CPU s per GB | CPUs busy |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        // The proxies' CPU has no baseline (the baselines run no proxy),
        // only a peer.
        let (baseline, peer) = baseline_and_peer(r.name);
        let per_gb = if r.name == baseline {
            "-".to_owned()
        } else {
            format!("{:.2} ({})", r.cpu_per_gb, ratio(r, |r| r.cpu_per_gb, peer))
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {:.1} | {:.2} | {} | {} | {:.0}% |",
            r.name,
            cell(r, |r| r.rps, 0),
            cell(r, |r| r.p50_us, 0),
            cell(r, |r| r.p99_us, 0),
            cell(r, |r| r.conns, 0),
            cell(r, |r| r.gbps, 2),
            r.rss_mib,
            r.cpu_s,
            per_gb,
            cell(r, |r| r.machine_per_gb, 2),
            r.machine_busy
        );
    }
    let _ = writeln!(
        s,
        "\nRows on the client's node are divided by `direct` and `haproxy`, its IPv6 rows (`-v6`: the same paths to IPv6 addresses, in the same run) by `direct-v6` and `haproxy-v6`; rows across the nodes by `direct-remote` and `haproxy-mtls` (HAProxy on each node, one thread each, TLS 1.3 with client certificates between them). For latency and CPU, lower is better, so a ratio below 1 is better; for the other figures a ratio above 1 is. Proxy RSS is the client node's proxy (node-a's mesh-daemon, or HAProxy); proxy CPU is that of the proxies at both ends of the row (both mesh-daemons for the cross-node rows, both HAProxies for haproxy-mtls) over all three measurements; CPU per GB is theirs during iperf3 over the bytes it moved. Machine CPU per GB counts every process and the kernel's network work (softirqs) on all CPUs during iperf3, and CPUs busy is their share of the time: a row near 100% is bound by the machine's CPUs: its GB/s cannot pass the number of CPUs divided by its machine CPU s per GB."
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_figure_is_its_own_median() {
        let row = |rps, p99| Row {
            name: "x",
            rps,
            p50_us: 1.0,
            p99_us: p99,
            conns: 1.0,
            gbps: 1.0,
            rss_mib: 1.0,
            cpu_s: 1.0,
            cpu_per_gb: 1.0,
            machine_per_gb: 1.0,
            machine_busy: 50.0,
        };
        let m = median_row(&[row(10.0, 900.0), row(30.0, 100.0), row(20.0, 5000.0)]);
        assert_eq!((m.rps, m.p99_us), (20.0, 900.0));
    }

    #[test]
    fn cross_node_rows_are_divided_by_cross_node_ones() {
        let row = |name, gbps| Row {
            name,
            rps: 1.0,
            p50_us: 1.0,
            p99_us: 1.0,
            conns: 1.0,
            gbps,
            rss_mib: 1.0,
            cpu_s: 1.0,
            cpu_per_gb: 1.0,
            machine_per_gb: 1.0,
            machine_busy: 50.0,
        };
        let rows = [
            row("direct", 20.0),
            row("haproxy", 10.0),
            row("proxy-local", 10.0),
            row("direct-remote", 8.0),
            row("proxy-mtls", 4.0),
            row("haproxy-mtls", 2.0),
        ];
        let t = render(&rows, 1, 1, false, "");
        let line = |n: &str| t.lines().find(|l| l.starts_with(&format!("| {n} |"))).unwrap().to_owned();
        assert!(line("proxy-mtls").contains("4.00 (0.50x direct-remote, 2.00x haproxy-mtls)"), "{t}");
        assert!(line("proxy-local").contains("10.00 (0.50x direct, 1.00x haproxy)"), "{t}");
    }

    #[test]
    fn proxy_cpu_per_gb_is_divided_by_the_peer_only_and_machine_cpu_by_both() {
        let row = |name, cpu_per_gb, machine_per_gb| Row {
            name,
            rps: 1.0,
            p50_us: 1.0,
            p99_us: 1.0,
            conns: 1.0,
            gbps: 1.0,
            rss_mib: 1.0,
            cpu_s: 1.0,
            cpu_per_gb,
            machine_per_gb,
            machine_busy: 93.4,
        };
        // The direct path's daemons idle: a tiny CPU per GB, no baseline.
        let rows = [row("direct-remote", 0.002, 0.8), row("proxy-mtls", 2.0, 2.4), row("haproxy-mtls", 4.0, 3.2)];
        let t = render(&rows, 1, 1, false, "");
        let line = |n: &str| t.lines().find(|l| l.starts_with(&format!("| {n} |"))).unwrap().to_owned();
        let mtls = line("proxy-mtls");
        assert!(mtls.contains("| 2.00 (0.50x haproxy-mtls) |"), "{mtls}");
        assert!(mtls.contains("| 2.40 (3.00x direct-remote, 0.75x haproxy-mtls) | 93% |"), "{mtls}");
        assert!(line("direct-remote").contains("| - | 0.80 (1.00x direct-remote"), "{t}");
    }

    #[test]
    fn parses_wrk_output() {
        let out = "Running 1s test @ http://10.96.0.21:80/\n  Latency Distribution\n     50%  212.00us\n     75%  300.00us\n     99%    1.50ms\n  1234 requests in 1.00s\nRequests/sec:  12345.67\nTransfer/sec: 1.00MB\n";
        assert_eq!(parse_wrk(out), Some((12345.67, 212.0, 1500.0)));
        assert_eq!(micros("2.00s"), Some(2_000_000.0));
        assert_eq!(parse_wrk("nothing"), None);
    }
}
