//! End-to-end tests of balancing and failover on the real kernel (root):
//! backends stopped and started under load, priorities, slow backends.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mesh_tests::sys::wait_until;
use mesh_tests::{Cluster, ClusterSpec, Daemon};

const VIP: &str = "10.96.0.10";
/// Fast checks, so the tests see health changes in seconds.
const CHECK: &str = "    healthCheck: { protocol: tcp, interval: 1s, timeout: 500ms, rise: 2, fall: 1 }\n";
const INTERVAL_MS: u128 = 1000;
/// The proxy failover test's checks: long enough that scheduling noise on
/// a busy machine is small against two intervals.
const SLOW_CHECK: &str = "    healthCheck: { protocol: tcp, interval: 2s, timeout: 500ms, rise: 2, fall: 1 }\n";
const SLOW_INTERVAL_MS: u128 = 2000;

/// These tests assert on timing (health detection, traffic returning), so
/// they run one at a time rather than competing for the machine's cores.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn cluster() -> Cluster {
    Cluster::create(
        &ClusterSpec::new()
            .node("node-a")
            .pod("client", "node-a")
            .pod("web-1", "node-a")
            .pod("web-2", "node-a")
            .pod("web-3", "node-a"),
    )
    .expect("mini cluster")
}

/// Service `web` over `(pod, weight, priority)`.
fn service(c: &Cluster, mode: &str, eps: &[(&str, u32, u32)], check: &str) -> String {
    let list: Vec<String> = eps
        .iter()
        .map(|(p, w, prio)| format!("      - {{ ip: {}, node: node-a, weight: {w}, priority: {prio} }}\n", c.pod(p).ip))
        .collect();
    format!(
        "  - name: web\n    vip: {VIP}\n    mode: {mode}\n    ports: [{{ port: 80, targetPort: 8080 }}]\n{check}    endpoints:\n{}",
        list.concat()
    )
}

fn start(c: &Cluster, services: &str) -> Daemon {
    let cfg = c.write_file("mesh.yaml", &c.config(services)).unwrap();
    c.start_daemon("node-a", &cfg, &[]).unwrap()
}

fn now_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis()
}

/// `mt-pod tally` from the client: counts per backend, and failures.
fn tally(c: &Cluster, n: u32) -> (BTreeMap<String, u64>, u64, String) {
    let out =
        c.exec("client", "mt-pod", &["tally", &format!("{VIP}:80"), &n.to_string()], Duration::from_secs(120)).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut counts = BTreeMap::new();
    let mut failed = 0;
    for kv in text.lines().filter(|l| !l.starts_with("error:")).flat_map(str::split_whitespace) {
        match kv.split_once('=') {
            Some(("failed", v)) => failed = v.parse().unwrap(),
            Some(("peer_is_dialled" | "direct", _)) | None => {}
            Some((k, v)) => {
                counts.insert(k.to_owned(), v.parse().unwrap());
            }
        }
    }
    (counts, failed, text)
}

fn endpoints(c: &Cluster) -> Vec<serde_json::Value> {
    let out = c.meshctl("node-a", &["get", "endpoints", "-o", "json"]).unwrap();
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap().as_array().unwrap().clone()
}

/// The effective weight of each endpoint, by pod name.
fn effective(c: &Cluster) -> BTreeMap<String, u64> {
    let eps = endpoints(c);
    ["web-1", "web-2", "web-3"]
        .iter()
        .filter_map(|p| {
            let ip = c.pod(p).ip.to_string();
            eps.iter().find(|e| e["ip"] == ip.as_str()).map(|e| (p.to_string(), e["effectiveWeight"].as_u64().unwrap()))
        })
        .collect()
}

/// Backends in the kernel slot table of the VIP.
fn slot_backends(c: &Cluster) -> Vec<String> {
    let out = c.meshctl("node-a", &["datapath", "dump", "-o", "json"]).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut b: Vec<String> =
        v["services"][0]["slots"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_owned()).collect();
    b.sort();
    b.dedup();
    b
}

#[test]
fn root_proxy_fails_over_without_client_errors() {
    let _serial = serial();
    let c = cluster();
    for p in ["web-1", "web-2", "web-3"] {
        c.serve(p, 8080, None).unwrap();
    }
    let d = start(&c, &service(&c, "proxy", &[("web-1", 1, 0), ("web-2", 1, 0), ("web-3", 1, 0)], SLOW_CHECK));
    // 3000 requests on new connections from 50 clients, ~12 s in all.
    let load = c.start("client", "mt-pod", &["load", &format!("{VIP}:80"), "3000", "50", "200"]).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let pid = c.spawned_pid_of("web-3").unwrap();
    c.terminate(pid).unwrap();
    let killed = now_ms();
    std::thread::sleep(Duration::from_secs(2));
    c.serve("web-3", 8080, None).unwrap();
    let restarted = now_ms();
    let out = load.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let start: u128 = text.lines().next().and_then(|l| l.strip_prefix("start=")).unwrap().parse().unwrap();
    let (killed, restarted) = (killed - start, restarted - start);
    let mut per: BTreeMap<&str, u64> = BTreeMap::new();
    let mut web3_times = Vec::new();
    let mut failures = Vec::new();
    for l in text.lines().skip(1).filter(|l| !l.starts_with("ok=")) {
        let (t, rest) = l.split_once(' ').unwrap();
        let t: u128 = t.parse().unwrap();
        if rest.starts_with("FAIL") {
            failures.push(l.to_owned());
        } else {
            *per.entry(if rest == "web-3" { "web-3" } else { "others" }).or_default() += 1;
            if rest == "web-3" {
                web3_times.push(t);
            }
        }
    }
    eprintln!("load: {per:?}, web-3 stopped at {killed} ms, back at {restarted} ms (since load start)");
    assert!(
        failures.is_empty(),
        "{} failed requests, e.g. {:?}\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        d.log_text()
    );
    assert_eq!(text.lines().last(), Some("ok=3000 failed=0"));
    assert!(web3_times.iter().any(|t| *t < killed), "web-3 served before it was stopped");
    assert!(!web3_times.iter().any(|t| *t > killed + 50 && *t < restarted), "web-3 answered while stopped");
    let back = web3_times.iter().find(|t| **t > restarted).copied();
    // Two intervals, plus a second for the check's timeout, scheduling on
    // a loaded machine and the request itself.
    let limit = restarted + 2 * SLOW_INTERVAL_MS + 1000;
    assert!(
        back.is_some_and(|t| t <= limit),
        "web-3 got no traffic within two check intervals of coming back: first at {back:?}, limit {limit}"
    );
    // Connects that hit the stopped backend before its check did were
    // retried elsewhere: no connection failed.
    assert_eq!(d.counter("proxy", "connect_failed").unwrap(), 0, "{}", d.stats().unwrap());
}

#[test]
fn root_kernel_mode_drops_a_dead_backend_from_the_slots() {
    let _serial = serial();
    let c = cluster();
    for p in ["web-1", "web-2", "web-3"] {
        c.serve(p, 8080, None).unwrap();
    }
    let check = "    healthCheck: { protocol: tcp, interval: 1s, timeout: 500ms, rise: 1, fall: 1 }\n";
    let _d = start(&c, &service(&c, "kernel", &[("web-1", 1, 0), ("web-2", 1, 0), ("web-3", 1, 0)], check));
    let web3 = format!("{}:8080", c.pod("web-3").ip);
    assert!(slot_backends(&c).contains(&web3));

    c.terminate(c.spawned_pid_of("web-3").unwrap()).unwrap();
    let stopped = Instant::now();
    let gone = wait_until(Duration::from_secs(5), || !slot_backends(&c).contains(&web3));
    let took = stopped.elapsed();
    eprintln!("kernel mode: web-3 left the slot table {took:?} after it stopped");
    assert!(gone && took <= Duration::from_millis(INTERVAL_MS as u64 + 1000), "took {took:?}: {:?}", slot_backends(&c));
    let (counts, failed, text) = tally(&c, 100);
    assert_eq!(failed, 0, "{text}");
    assert!(!counts.contains_key("web-3"), "{text}");

    c.serve("web-3", 8080, None).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || slot_backends(&c).contains(&web3)),
        "web-3 did not come back into the slots"
    );
    let (counts, failed, text) = tally(&c, 300);
    assert_eq!(failed, 0, "{text}");
    assert!(counts.get("web-3").is_some_and(|n| *n > 0), "{text}");
}

#[test]
fn root_priority_failover_and_return() {
    let _serial = serial();
    let c = cluster();
    for p in ["web-1", "web-2", "web-3"] {
        c.serve(p, 8080, None).unwrap();
    }
    let check = "    healthCheck: { protocol: tcp, interval: 1s, timeout: 500ms, rise: 1, fall: 1 }\n";
    let _d = start(&c, &service(&c, "proxy", &[("web-1", 1, 0), ("web-2", 1, 0), ("web-3", 1, 1)], check));
    let (counts, failed, text) = tally(&c, 40);
    assert_eq!(failed, 0, "{text}");
    assert!(!counts.contains_key("web-3") && counts.len() == 2, "priority 1 served while priority 0 was up: {text}");

    for p in ["web-1", "web-2"] {
        c.terminate(c.spawned_pid_of(p).unwrap()).unwrap();
    }
    let want_down = BTreeMap::from([("web-1".to_owned(), 0), ("web-2".to_owned(), 0), ("web-3".to_owned(), 1)]);
    assert!(wait_until(Duration::from_secs(5), || effective(&c) == want_down), "{:?}", effective(&c));
    let table = String::from_utf8_lossy(&c.meshctl("node-a", &["get", "endpoints"]).unwrap().stdout).into_owned();
    assert!(table.contains("HEALTH") && table.contains("unhealthy") && table.contains("connect:"), "{table}");
    let (counts, failed, text) = tally(&c, 40);
    assert_eq!(failed, 0, "{text}");
    assert_eq!(counts, BTreeMap::from([("web-3".to_owned(), 40)]), "{text}");

    for p in ["web-1", "web-2"] {
        c.serve(p, 8080, None).unwrap();
    }
    let want_up = BTreeMap::from([("web-1".to_owned(), 1), ("web-2".to_owned(), 1), ("web-3".to_owned(), 0)]);
    assert!(wait_until(Duration::from_secs(5), || effective(&c) == want_up), "{:?}", effective(&c));
    let (counts, failed, text) = tally(&c, 40);
    assert_eq!(failed, 0, "{text}");
    assert!(!counts.contains_key("web-3"), "traffic did not return to priority 0: {text}");
}

#[test]
fn root_slow_backend_gets_a_smaller_share() {
    let _serial = serial();
    let c = cluster();
    c.serve("web-1", 8080, None).unwrap();
    c.serve_with("web-2", 8080, None, &["--delay-ms", "50"]).unwrap();
    let _d = start(&c, &service(&c, "proxy", &[("web-1", 1, 0), ("web-2", 1, 0)], CHECK));
    let out = c
        .exec("client", "mt-pod", &["load", &format!("{VIP}:80"), "1500", "50", "0"], Duration::from_secs(120))
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(text.lines().last(), Some("ok=1500 failed=0"), "{}", &text[text.len().saturating_sub(500)..]);
    let slow = text.lines().filter(|l| l.ends_with(" web-2")).count();
    let share = slow as f64 * 100.0 / 1500.0;
    eprintln!("equal weights, web-2 answers 50 ms late: web-2 got {share:.1}% of 1500 requests (its weight alone would give 50%)");
    assert!(share < 40.0, "the slow backend still got {share:.1}%");
}
