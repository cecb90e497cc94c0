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

/// One node of `stack` with client, web-1 and web-2 (HTTP on 8080).
fn client_and_two_webs(stack: Stack) -> Cluster {
    let spec = ClusterSpec::new().stack(stack).node("node-a").pod("client", "node-a");
    let c = Cluster::create(&spec.pod("web-1", "node-a").pod("web-2", "node-a")).expect("mini cluster");
    c.serve("web-1", 8080, None).unwrap();
    c.serve("web-2", 8080, None).unwrap();
    c
}

fn counter(d: &Daemon, group: &str, name: &str) -> u64 {
    d.counter(group, name).unwrap()
}

#[test]
fn root_ipv6_only_pods_reach_an_ipv6_vip_in_kernel_and_proxy_mode() {
    let c = client_and_two_webs(Stack::Ipv6);
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

/// A service with an IPv4 and an IPv6 VIP, in each mode: each VIP's
/// connections go to the endpoints of its family (web-1 by IPv4, web-2 by
/// IPv6), getpeername shows the VIP dialled.
#[test]
fn root_dual_stack_service_answers_on_both_vips_from_each_familys_endpoints() {
    let c = client_and_two_webs(Stack::Dual);
    let (w1, w2) = (c.pod("web-1").ip, c.pod("web-2").ip6.unwrap());
    let port = "{ port: 80, targetPort: 8080 }";
    let eps = [endpoint(w1, "node-a", 1), endpoint(w2, "node-a", 1)];
    let services = [
        service("dp", "10.96.0.20, 'fd00:96::20'", "proxy", port, &eps),
        service("dk", "10.96.0.21, 'fd00:96::21'", "kernel", port, &eps),
    ]
    .concat();
    let cfg = c.write_file("mesh.yaml", &c.config(&services)).unwrap();
    let d = c.start_daemon("node-a", &cfg, &[]).unwrap();
    for (mode, v4, v6) in
        [("proxy", "10.96.0.20:80", "[fd00:96::20]:80"), ("kernel", "10.96.0.21:80", "[fd00:96::21]:80")]
    {
        let (by, _, dialled, _) = tally(&c, "client", v4, 50);
        assert_eq!(by, BTreeMap::from([("web-1".to_owned(), 50)]), "{mode} {v4}: IPv4 endpoints only");
        assert_eq!(dialled, 50, "{mode} {v4}");
        let (by, _, dialled, _) = tally(&c, "client", v6, 50);
        assert_eq!(by, BTreeMap::from([("web-2".to_owned(), 50)]), "{mode} {v6}: IPv6 endpoints only");
        assert_eq!(dialled, 50, "{mode} {v6}");
    }
    // Two frontends per port, each with its own id.
    let dump = c.meshctl("node-a", &["datapath", "dump", "-o", "json"]).unwrap();
    let dump: serde_json::Value = serde_json::from_slice(&dump.stdout).unwrap();
    let ids: Vec<u64> = dump["services"].as_array().unwrap().iter().map(|s| s["id"].as_u64().unwrap()).collect();
    let unique: std::collections::BTreeSet<_> = ids.iter().collect();
    assert_eq!((ids.len(), unique.len()), (4, 4), "{dump}");

    // Each family mistake is refused through the API with its path, and
    // nothing changes: not the generation, not the maps.
    let client6 = c.pod("client").ip6.unwrap();
    let w1_6 = c.pod("web-1").ip6.unwrap();
    let mistakes = [
        (
            service("dp", "10.96.0.20, 10.96.0.22", "proxy", port, &eps),
            "services[0].vips[1]: 10.96.0.22 is a second IPv4 address (10.96.0.20 is one already)",
        ),
        (
            service("dp", "10.96.0.20", "proxy", port, &eps),
            "services[0].endpoints[1].ip: fd00:244:1::4 is IPv6, but the service has no IPv6 VIP (10.96.0.20)",
        ),
        (
            service("dp", "10.96.0.20, 'fe80::20'", "proxy", port, &eps),
            "services[0].vips[1]: fe80::20 is a link-local address",
        ),
        (
            service("dp", &format!("10.96.0.20, '{client6}'"), "proxy", port, &eps),
            "services[0].vips[1]: fd00:244:1::2 is the address of workload default/client (workloads[0])",
        ),
        (
            service(
                "dp",
                "10.96.0.20, 'fd00:96::20'",
                "proxy",
                port,
                &[endpoint(w1_6, "node-a", 1), endpoint("ff05::1", "node-a", 1)],
            ),
            "services[0].endpoints[1].ip: ff05::1 is a multicast address",
        ),
    ];
    let generation = |c: &Cluster| -> u64 {
        let out = c.meshctl("node-a", &["status", "-o", "json"]).unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["generation"].as_u64().unwrap()
    };
    let before = generation(&c);
    for (i, (svc, want)) in mistakes.iter().enumerate() {
        let f = c.write_file(&format!("bad-{i}.yaml"), &c.config(svc)).unwrap();
        let out = c.meshctl("node-a", &["apply", "-f", f.to_str().unwrap()]).unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("400") && err.contains(want),
            "mistake {i}: want {want:?} in {err}"
        );
        assert_eq!(generation(&c), before, "mistake {i} changed the state");
    }
    let after = c.meshctl("node-a", &["datapath", "dump", "-o", "json"]).unwrap();
    let after: serde_json::Value = serde_json::from_slice(&after.stdout).unwrap();
    assert_eq!(after["services"], dump["services"], "a refused write reached the kernel");
    drop(d);
}

/// The request path over IPv6: one HTTP/2 connection to an IPv6 VIP whose
/// requests a Gateway API route splits 70/30 between two backend Services
/// (each decided per request), and HTTP/1.1 to the same VIP; an
/// AuthorizationPolicy denying an IPv6 `ipBlocks` holds for a client on
/// the endpoints' node; metrics and the access log write IPv6 addresses
/// with brackets.
#[test]
fn root_http2_a_route_and_an_ipv6_ip_block_over_ipv6() {
    let mut spec = ClusterSpec::new().stack(Stack::Ipv6).node("node-a").pod("client", "node-a").pod("denied", "node-a");
    for p in ["echo", "echo-v1", "echo-v2"] {
        spec = spec.pod(p, "node-a");
    }
    let c = Cluster::create(&spec).expect("mini cluster");
    for p in ["echo", "echo-v1", "echo-v2"] {
        c.serve_http(p, 8080, &[]).unwrap();
    }
    let svc = |name: &str, vip: &str| {
        let ep = endpoint(c.pod(name).ip6.unwrap(), "node-a", 1);
        service(name, &format!("'{vip}'"), "proxy", "{ port: 80, targetPort: 8080, appProtocol: auto }", &[ep])
    };
    let route = "routes:
  - apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: {name: split}
    spec:
      parentRefs: [{group: '', kind: Service, name: echo, port: 80}]
      rules:
      - backendRefs: [{name: echo-v1, port: 80, weight: 70}, {name: echo-v2, port: 80, weight: 30}]
policies:
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: no-denied, namespace: default}
    spec:
      action: DENY
      rules: [{from: [{source: {ipBlocks: ['DENIED/128']}}]}]
";
    let route = route.replace("DENIED", &c.pod("denied").ip6.unwrap().to_string());
    let services = [svc("echo", "fd00:96::30"), svc("echo-v1", "fd00:96::31"), svc("echo-v2", "fd00:96::32")].concat();
    let cfg = c.write_file("mesh.yaml", &format!("{}{route}", c.config(&services))).unwrap();
    let d = c.start_daemon("node-a", &cfg, &["--log-format", "json"]).unwrap();

    let mut f = mesh_tests::follow::Follower::open(&c, "client", "[fd00:96::30]:80", true).unwrap();
    let t = f.batch(400, "/").unwrap();
    let v1 = t.get("echo-v1").copied().unwrap_or(0);
    assert_eq!(v1 + t.get("echo-v2").copied().unwrap_or(0), 400, "the route decides every request: {t:?}");
    assert_share(v1, 400, 0.7, "route 70/30 over IPv6, one HTTP/2 connection: echo-v1", &t);
    drop(f);

    let (code, body) = c.curl("client", "http://[fd00:96::30]/").unwrap();
    assert_eq!(code, 0, "{body}");
    assert!(body.contains("backend=echo-v"), "{body}");
    // The caller's IPv6 address, believed because its workload has it, is
    // denied on the endpoints' own node.
    let status = |pod: &str| {
        let args = ["-sS", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}", "http://[fd00:96::30]/"];
        let out = c.exec(pod, "curl", &args, Duration::from_secs(10)).unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(status("denied"), "403", "{}", d.log_text());
    assert_eq!(status("client"), "200");

    // `[addr]:port` in the stats and the access log.
    let client = c.pod("client").ip6.unwrap();
    let line = || d.log_text().lines().find(|l| l.contains("\"target\":\"access\"")).map(str::to_owned);
    assert!(wait_until(Duration::from_secs(5), || line().is_some()), "{}", d.log_text());
    let v: serde_json::Value = serde_json::from_str(&line().unwrap()).unwrap();
    let endpoint = v["fields"]["endpoint"].as_str().unwrap_or_default().to_owned();
    assert!(endpoint.starts_with("[fd00:244:1::") && endpoint.ends_with("]:8080"), "{v}");
    let text = d.log_text();
    assert!(text.contains(&format!("[{client}]:")), "the client by its IPv6 address: {text}");
    let stats = c.meshctl("node-a", &["stats"]).unwrap();
    let stats = String::from_utf8_lossy(&stats.stdout);
    assert!(stats.contains(&format!("[{}]:8080", c.pod("echo-v1").ip6.unwrap())), "{stats}");
}

/// Nodes with IPv6 addresses only: a pod's connection to a service whose
/// endpoint is on another node crosses the mTLS tunnel between their IPv6
/// addresses; the endpoint's node enforces the service's authorization;
/// and a workload identity's certificate presented from another node's
/// IPv6 address than its workload's is refused (the node binding).
#[test]
fn root_nodes_with_ipv6_addresses_only_tunnel_authorize_and_bind_identities_to_nodes() {
    let spec = ClusterSpec::new().stack(Stack::Ipv6).node("node-a").node("node-b").node("node-c");
    let c = Cluster::create(&spec.pod("client-a", "node-a").pod("other", "node-a").pod("web-b", "node-b"))
        .expect("mini cluster");
    c.serve("web-b", 8080, None).unwrap();
    let web_b = c.pod("web-b").ip6.unwrap();
    let svc = format!(
        "  - name: web\n    vip: 'fd00:96::40'\n    ports: [{{ port: 80, targetPort: 8080 }}]\n    healthCheck: {{ protocol: none }}\n    \
         authorization: {{ identities: [\"spiffe://cluster.local/ns/default/sa/client-a\"] }}\n    endpoints: [{}]\n",
        endpoint(web_b, "node-b", 1)
    );
    let cfg = c.write_file("mesh.yaml", &c.config(&svc)).unwrap();
    let a = c.start_daemon("node-a", &cfg, &[]).unwrap();
    let b = c.start_daemon("node-b", &cfg, &[]).unwrap();

    let (code, body) = c.curl("client-a", "http://[fd00:96::40]/").unwrap();
    assert_eq!(code, 0, "{body}\n{}\n{}", a.log_text(), b.log_text());
    assert!(body.contains("backend=web-b"), "{body}");
    // (The nodes have no IPv4 address: the tunnel is between their IPv6 ones.)
    assert_eq!(b.counter("tunnel", "streams").unwrap(), 1, "through the tunnel");

    // sa/other is not allowed: node-b refuses its stream.
    let (code, _) = c.curl("other", "http://[fd00:96::40]/").unwrap();
    assert_ne!(code, 0, "sa/other reached web");
    assert_eq!(b.counter("tunnel", "denied_policy").unwrap(), 1, "{}", b.log_text());

    // client-a's certificate, from node-c's IPv6 address rather than
    // node-a's (where the state places client-a): refused.
    let cert =
        c.issue_cert(&c.ca_dir().unwrap(), "spiffe://cluster.local/ns/default/sa/client-a", 3600, "client").unwrap();
    let tunnel = format!("[{}]:15008", c.node("node-b").address6.unwrap());
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", c.node("node-c").netns.display()))
        .arg(&c.bins.mt_tunnel)
        .args([tunnel.as_str(), cert.to_str().unwrap(), &format!("[{web_b}]:8080"), "default/web"])
        .output()
        .unwrap();
    let got = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(got, "status=403 deny=wrong-node", "{}{}", String::from_utf8_lossy(&out.stderr), b.log_text());
    assert_eq!(b.counter("tunnel", "denied_wrong_node").unwrap(), 1);
    let log = b.log_with("the one the stream came from", 1);
    let node_c = c.node("node-c").address6.unwrap();
    assert!(
        log.contains("spiffe://cluster.local/ns/default/sa/client-a") && log.contains(&format!("from={node_c}")),
        "{log}"
    );
}

/// Failover over IPv6: the preferred endpoint's server stops, and new
/// connections through the proxy go to the next priority at once, each
/// connect to the stopped one retried there: no client sees an error.
#[test]
fn root_priority_failover_over_ipv6_without_client_errors() {
    let c = client_and_two_webs(Stack::Ipv6);
    let (w1, w2) = (c.pod("web-1").ip6.unwrap(), c.pod("web-2").ip6.unwrap());
    let eps = [
        format!("{{ ip: '{w1}', node: node-a, priority: 0 }}"),
        format!("{{ ip: '{w2}', node: node-a, priority: 1 }}"),
    ];
    let svc = service("p", &format!("'{PROXY_VIP6}'"), "proxy", "{ port: 80, targetPort: 8080 }", &eps);
    let cfg = c.write_file("mesh.yaml", &c.config(&svc)).unwrap();
    let d = c.start_daemon("node-a", &cfg, &[]).unwrap();
    let addr = format!("[{PROXY_VIP6}]:80");
    let (by, ..) = tally(&c, "client", &addr, 20);
    assert_eq!(by, BTreeMap::from([("web-1".to_owned(), 20)]), "priority 0 while it is up");
    c.terminate(c.spawned_pid_of("web-1").unwrap()).unwrap();
    // tally asserts that none failed.
    let (by, ..) = tally(&c, "client", &addr, 50);
    assert_eq!(by, BTreeMap::from([("web-2".to_owned(), 50)]), "{}", d.log_text());
}
