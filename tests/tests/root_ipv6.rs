//! IPv6 and dual-stack on the real kernel (root): IPv6-only pods reaching
//! an IPv6 VIP in both modes, a dual-stack service answering on both of
//! its VIPs from each family's endpoints, HTTP/2 and a route over IPv6,
//! and nodes that reach each other over IPv6 only (the mTLS tunnel, its
//! authorization and the node binding).
//!
//! Which code paths this covers once over IPv6 (the rest of the suite
//! runs them over IPv4): connect6 and getpeername6 with a native IPv6
//! destination in kernel mode (slot tables of IPv6 backends) and in proxy
//! mode (sockops recording an IPv6 client, the proxy's IPv6 listener and
//! its original-destination lookup); the frontend per family of a
//! dual-stack service; the request path (HTTP/2, a Gateway API route);
//! the tunnel between IPv6 node addresses with its authorization and
//! node binding. IPv4 dialled from IPv6 sockets is in root_control.

use std::collections::BTreeMap;
use std::time::Duration;

use mesh_tests::loadgen::assert_share;
use mesh_tests::sys::wait_until;
use mesh_tests::{Cluster, ClusterSpec, Daemon, Stack};

const KERNEL_VIP6: &str = "fd00:96::10";
const PROXY_VIP6: &str = "fd00:96::11";

/// `n` requests from `pod` to `addr`, each on a new connection:
/// (answers by backend, failed, getpeername was `addr`, backend saw the
/// client's own address).
fn tally(c: &Cluster, pod: &str, addr: &str, n: u32) -> (BTreeMap<String, u64>, u64, u64, u64) {
    let out = c.exec(pod, "mt-pod", &["tally", addr, &n.to_string()], Duration::from_secs(120)).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "tally: {text}");
    let (mut by, mut failed, mut dialled, mut direct) = (BTreeMap::new(), 0, 0, 0);
    for kv in text.lines().filter(|l| !l.starts_with("error:")).flat_map(str::split_whitespace) {
        let Some((k, v)) = kv.split_once('=') else { continue };
        let v: u64 = v.parse().unwrap_or(0);
        match k {
            "failed" => failed = v,
            "peer_is_dialled" => dialled = v,
            "direct" => direct = v,
            b => {
                by.insert(b.to_owned(), v);
            }
        }
    }
    assert_eq!(failed, 0, "{addr}: {text}");
    (by, failed, dialled, direct)
}

fn endpoint(ip: impl std::fmt::Display, node: &str, weight: u32) -> String {
    format!("{{ ip: '{ip}', node: {node}, weight: {weight} }}")
}

fn service(name: &str, vips: &str, mode: &str, ports: &str, endpoints: &[String]) -> String {
    format!(
        "  - name: {name}\n    vips: [{vips}]\n    mode: {mode}\n    ports: [{ports}]\n    endpoints: [{}]\n",
        endpoints.join(", ")
    )
}

fn counter(d: &Daemon, group: &str, name: &str) -> u64 {
    d.counter(group, name).unwrap()
}

#[test]
fn root_ipv6_only_pods_reach_an_ipv6_vip_in_kernel_and_proxy_mode() {
    let spec = ClusterSpec::new().stack(Stack::Ipv6).node("node-a").pod("client", "node-a");
    let c = Cluster::create(&spec.pod("web-1", "node-a").pod("web-2", "node-a")).expect("mini cluster");
    c.serve("web-1", 8080, None).unwrap();
    c.serve("web-2", 8080, None).unwrap();
    let (w1, w2) = (c.pod("web-1").ip6.unwrap(), c.pod("web-2").ip6.unwrap());
    let port = "{ port: 80, targetPort: 8080 }";
    let services = [
        service(
            "k",
            &format!("'{KERNEL_VIP6}'"),
            "kernel",
            port,
            &[endpoint(w1, "node-a", 7), endpoint(w2, "node-a", 3)],
        ),
        service(
            "p",
            &format!("'{PROXY_VIP6}'"),
            "proxy",
            port,
            &[endpoint(w1, "node-a", 1), endpoint(w2, "node-a", 1)],
        ),
    ]
    .concat();
    let cfg = c.write_file("mesh.yaml", &c.config(&services)).unwrap();
    let d = c.start_daemon("node-a", &cfg, &[]).unwrap();
    let listening = || d.log_text().contains(r#"proxy listening outbound="0.0.0.0:15001 [::]:15001""#);
    assert!(wait_until(Duration::from_secs(5), listening), "the proxy listens on IPv6 too: {}", d.log_text());

    // Kernel mode: 7:3, the backend sees the client itself, getpeername
    // shows the IPv6 VIP.
    let n = 1000;
    let (by, _, dialled, direct) = tally(&c, "client", &format!("[{KERNEL_VIP6}]:80"), n);
    let ones = by.get("web-1").copied().unwrap_or(0);
    assert_eq!(ones + by.get("web-2").copied().unwrap_or(0), u64::from(n), "{by:?}");
    assert_share(ones, u64::from(n), 0.7, "kernel mode over IPv6, web-1 at weight 7 of 10", &by);
    assert_eq!((dialled, direct), (u64::from(n), u64::from(n)), "getpeername and the backend's view: {by:?}");
    // (The daemon's health checks of the IPv6 endpoints are IPv6 connects too.)
    assert!(counter(&d, "kernel", "ipv6") >= u64::from(n), "connect6 saw each connect as IPv6");
    assert!(counter(&d, "kernel", "kernel_balanced") >= u64::from(n));

    // Proxy mode: balanced by the proxy, which the backend sees instead of
    // the client; getpeername still shows the VIP.
    let forwarded = counter(&d, "proxy", "forwarded");
    let n = 400;
    let (by, _, dialled, direct) = tally(&c, "client", &format!("[{PROXY_VIP6}]:80"), n);
    let ones = by.get("web-1").copied().unwrap_or(0);
    assert_eq!(ones + by.get("web-2").copied().unwrap_or(0), u64::from(n), "{by:?}");
    // The proxy weighs latency besides weight (peak EWMA): equal weights
    // share, not evenly.
    assert!(ones >= u64::from(n) / 10 && ones <= u64::from(n) * 9 / 10, "both endpoints take connections: {by:?}");
    assert_eq!((dialled, direct), (u64::from(n), 0), "{by:?}");
    assert_eq!(counter(&d, "proxy", "forwarded") - forwarded, u64::from(n), "the proxy counts each connection");
    assert_eq!(counter(&d, "proxy", "no_orig_dst"), 0);

    // The dump writes IPv6 service and backend addresses the usual way.
    let dump = c.meshctl("node-a", &["datapath", "dump", "-o", "json"]).unwrap();
    let dump: serde_json::Value = serde_json::from_slice(&dump.stdout).unwrap();
    let k = dump["services"].as_array().unwrap().iter().find(|s| s["address"] == "[fd00:96::10]:80").unwrap();
    assert!(k["slots"].as_array().unwrap().iter().any(|s| *s == format!("[{w1}]:8080")), "{k}");
}
