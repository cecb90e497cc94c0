//! `cargo xtask demo`: one node, a client pod and two backends, the daemon,
//! and requests from the client to the service VIP.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mesh_tests::{Cluster, ClusterSpec};

const VIP: &str = "10.96.0.10";

pub fn demo(requests: u32) -> anyhow::Result<()> {
    mesh_tests::sys::require_root()?;
    say("building the daemon (with its eBPF programs) and the pod tools");
    crate::build_bins(false)?;

    say("building a mini cluster: node-a with pods client, web-1, web-2");
    let spec = ClusterSpec::new().node("node-a").pod("client", "node-a").pod("web-1", "node-a").pod("web-2", "node-a");
    let cluster = Cluster::create(&spec)?;
    for pod in ["client", "web-1", "web-2"] {
        let p = cluster.pod(pod);
        say(&format!("  pod {pod:<7} {}  (netns {})", p.ip, p.netns.display()));
    }
    cluster.serve("web-1", 8080, None)?;
    cluster.serve("web-2", 8080, None)?;
    say("  web-1 and web-2 serve HTTP on :8080 and answer with their name");

    let (w1, w2) = (cluster.pod("web-1").ip, cluster.pod("web-2").ip);
    let services = format!(
        "  - name: web\n    vip: {VIP}\n    mode: proxy\n    ports: [{{ port: 80, targetPort: 8080 }}]\n    endpoints:\n      - {{ ip: {w1}, node: node-a, weight: 1 }}\n      - {{ ip: {w2}, node: node-a, weight: 1 }}\n"
    );
    let config = cluster.config(&services);
    let path = cluster.write_file("mesh.yaml", &config)?;
    say(&format!("config ({}):", path.display()));
    for line in config.lines() {
        println!("    {line}");
    }

    say("starting mesh-daemon for node-a (attaches connect4, connect6, sockops, getpeername4 and getpeername6 to the node's cgroup)");
    let mut daemon = cluster.start_daemon("node-a", &path, &["--cleanup-on-exit"])?;
    say(&format!("  ready; pid {}, maps pinned under {}", daemon.pid(), daemon.node.pin_dir.display()));

    say(&format!("sending {requests} requests from pod client to http://{VIP}/ with curl, one connection each"));
    let started = Instant::now();
    let mut answered: BTreeMap<String, u32> = BTreeMap::new();
    let mut failed = 0;
    // One curl per 50 URLs; `Connection: close` makes each request a new connection.
    let mut left = requests;
    while left > 0 {
        let n = left.min(50);
        left -= n;
        let url = format!("http://{VIP}/");
        let mut args = vec!["-sS", "--max-time", "10", "-H", "Connection: close"];
        args.extend(std::iter::repeat_n(url.as_str(), n as usize));
        let out = cluster.exec("client", "curl", &args, Duration::from_secs(60))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let ok: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("backend=")).collect();
        failed += n as usize - ok.len();
        for l in ok {
            *answered.entry(l.split_whitespace().next().unwrap_or_default().to_owned()).or_default() += 1;
        }
    }
    say(&format!("done in {:.1} s; which backend answered:", started.elapsed().as_secs_f64()));
    for (backend, n) in &answered {
        println!("    {backend:<8} {n:>5}  {}", "#".repeat((*n as usize * 40).div_ceil(requests.max(1) as usize)));
    }
    if failed > 0 {
        println!("    failed   {failed:>5}");
    }
    let stats = daemon.stats()?;
    say("daemon counters:");
    println!(
        "    kernel: redirected {}, not enrolled {}",
        stats["kernel"]["redirected"], stats["kernel"]["not_enrolled"]
    );
    println!(
        "    proxy:  forwarded {}, connect failures {}, bytes to client {}",
        stats["proxy"]["forwarded"], stats["proxy"]["connect_failed"], stats["proxy"]["bytes_to_client"]
    );

    say("meshctl get endpoints (the daemon's control API, on its Unix socket):");
    let out = cluster.meshctl("node-a", &["get", "endpoints"])?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("    {line}");
    }

    say("stopping the daemon (SIGTERM with --cleanup-on-exit: detach programs, remove pins) and tearing down the cluster");
    let status = daemon.stop()?;
    drop(cluster);
    say(&format!("daemon exited with {status}; all namespaces, cgroups and pins removed"));
    if failed > 0 || !status.success() {
        anyhow::bail!("{failed} of {requests} requests failed");
    }
    Ok(())
}

fn say(s: &str) {
    println!("demo: {s}");
}
