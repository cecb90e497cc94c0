//! Cluster scale on one node (root, real kernel): 10 000 kernel-mode
//! services of 10 endpoints each are applied, fit the default slot map
//! (tables sized by their weights), and balance in the kernel: the first,
//! the middle and the last service answer, and weights 3:2 on one of them
//! split new connections by weight. Timings are printed, not asserted.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mesh_tests::{Cluster, ClusterSpec};

const SERVICES: usize = 10_000;
const BACKENDS: usize = 10;

fn vip(i: usize) -> String {
    format!("10.96.{}.{}", i / 250, i % 250 + 1)
}

/// `SERVICES` kernel-mode services over the ten backends; the middle one
/// has only web-0 (weight 3) and web-1 (weight 2).
fn services(c: &Cluster) -> String {
    let eps: Vec<String> =
        (0..BACKENDS).map(|b| format!("{{ ip: {}, node: node-a }}", c.pod(&format!("web-{b}")).ip)).collect();
    let all = eps.join(", ");
    let middle = format!(
        "{{ ip: {}, node: node-a, weight: 3 }}, {{ ip: {}, node: node-a, weight: 2 }}",
        c.pod("web-0").ip,
        c.pod("web-1").ip
    );
    let mut out = String::with_capacity(SERVICES * 600);
    for i in 0..SERVICES {
        let endpoints = if i == SERVICES / 2 { &middle } else { &all };
        out += &format!(
            "  - {{ name: s{i}, vip: {}, mode: kernel, ports: [{{ port: 80, targetPort: 8080 }}], healthCheck: {{ protocol: none }}, endpoints: [{endpoints}] }}\n",
            vip(i)
        );
    }
    out
}

/// Connections from the client to `vip`:80, each new: backend -> count.
fn tally(c: &Cluster, vip: &str, n: u32) -> BTreeMap<String, u64> {
    let out =
        c.exec("client", "mt-pod", &["tally", &format!("{vip}:80"), &n.to_string()], Duration::from_secs(120)).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "tally: {text}");
    text.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        .collect()
}

#[test]
fn root_ten_thousand_kernel_services_of_ten_endpoints_fit_and_balance_by_weight() {
    let mut spec = ClusterSpec::new().node("node-a").pod("client", "node-a");
    for b in 0..BACKENDS {
        spec = spec.plain_pod(&format!("web-{b}"), "node-a");
    }
    let c = Cluster::create(&spec).expect("mini cluster");
    for b in 0..BACKENDS {
        c.serve(&format!("web-{b}"), 8080, None).unwrap();
    }
    let cfg = c.write_file("mesh.yaml", &c.config("").replace("services:\n", "services: []\n")).unwrap();
    let d = c.start_daemon("node-a", &cfg, &[]).unwrap();

    let file = c.write_file("scale.yaml", &c.config(&services(&c))).unwrap();
    let t0 = Instant::now();
    let out = c.meshctl("node-a", &["apply", "-f", file.to_str().unwrap()]).unwrap();
    let applied = t0.elapsed();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stderr), d.log_text());
    println!("apply of {SERVICES} kernel services x {BACKENDS} endpoints: {applied:.2?} (debug build)");

    let dump = c.meshctl("node-a", &["datapath", "dump", "-o", "json"]).unwrap();
    let dump: serde_json::Value = serde_json::from_slice(&dump.stdout).unwrap();
    let tables = dump["services"].as_array().unwrap();
    assert_eq!(tables.iter().filter(|s| s["mode"] == "kernel").count(), SERVICES);
    let slots: usize = tables.iter().map(|s| s["slots"].as_array().map_or(0, Vec::len)).sum();
    assert_eq!(slots, (SERVICES - 1) * BACKENDS + 5, "ten slots per table of ten equal weights, five for 3:2");
    // The slot map is not preallocated: its memory follows the slots in use.
    let map = c.node("node-a").pin_dir.join("SLOTS");
    let info = mesh_tests::sys::bpftool(&["map", "show", "pinned", map.to_str().unwrap()]).unwrap();
    assert_eq!(info["flags"].as_u64().map(|f| f & 1), Some(1), "BPF_F_NO_PREALLOC: {info}");
    println!(
        "SLOTS: {} entries at most, {} bytes of buckets allocated up front",
        info["max_entries"], info["bytes_memlock"]
    );

    // The first, the middle and the last service answer.
    for i in [0, SERVICES / 2, SERVICES - 1] {
        let t = tally(&c, &vip(i), 20);
        assert_eq!(t.get("failed").copied().unwrap_or(0), 0, "service {i}: {t:?}");
        let answered: u64 = t.iter().filter(|(k, _)| k.starts_with("web-")).map(|(_, v)| v).sum();
        assert_eq!(answered, 20, "service {i}: {t:?}");
    }
    // 3:2 over 2000 new connections.
    let t = tally(&c, &vip(SERVICES / 2), 2000);
    let (a, b) = (t.get("web-0").copied().unwrap_or(0), t.get("web-1").copied().unwrap_or(0));
    assert_eq!(a + b, 2000, "{t:?}");
    mesh_tests::loadgen::assert_share(a, 2000, 0.6, "3:2 at scale, web-0", &t);

    // One endpoint's weight at this size.
    let t0 = Instant::now();
    let w = c.meshctl("node-a", &["set-weight", "s0", &c.pod("web-3").ip.to_string(), "2"]).unwrap();
    assert!(w.status.success(), "{}", String::from_utf8_lossy(&w.stderr));
    println!("one set-weight at {SERVICES} services: {:.2?} (debug build)", t0.elapsed());
}
