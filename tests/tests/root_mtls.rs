//! End-to-end tests of the mTLS tunnel between two nodes (root, real
//! kernel): bytes through the tunnel, nothing readable on the wire, and
//! every kind of refusal counted and logged with no connection to the pod.

use std::time::Duration;

use mesh_tests::sys::wire_contains;
use mesh_tests::{Cluster, ClusterSpec, Daemon};

const VIP: &str = "10.96.0.10";
const ECHO_VIP: &str = "10.96.0.11";

struct TwoNodes {
    a: Daemon,
    b: Daemon,
    c: Cluster,
}

/// client-a and web-a on node-a, web-b on node-b (HTTP 8080, echo 9000);
/// `web` and `echo` have their only endpoint, web-b, on node-b.
fn two_nodes(web_extra: &str) -> TwoNodes {
    let c = Cluster::create(
        &ClusterSpec::new()
            .node("node-a")
            .node("node-b")
            .pod("client-a", "node-a")
            .pod("web-a", "node-a")
            .pod("web-b", "node-b"),
    )
    .expect("mini cluster");
    c.serve("web-a", 8080, None).unwrap();
    c.serve("web-b", 8080, Some(9000)).unwrap();
    let cfg = c.write_file("mesh.yaml", &c.config(&services(&c, web_extra))).unwrap();
    let a = c.start_daemon("node-a", &cfg, &[]).unwrap();
    let b = c.start_daemon("node-b", &cfg, &[]).unwrap();
    TwoNodes { a, b, c }
}

fn services(c: &Cluster, web_extra: &str) -> String {
    let wb = c.pod("web-b").ip;
    format!(
        "  - name: web\n    vip: {VIP}\n    ports: [{{ port: 80, targetPort: 8080 }}]\n{web_extra}    endpoints: [{{ ip: {wb}, node: node-b }}]\n\
         \x20 - name: echo\n    vip: {ECHO_VIP}\n    ports: [{{ port: 9000 }}]\n    endpoints: [{{ ip: {wb}, node: node-b }}]\n"
    )
}

fn field<'a>(body: &'a str, key: &str) -> &'a str {
    body.split_whitespace().find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('='))).unwrap_or("")
}

fn tunnel(d: &Daemon, name: &str) -> u64 {
    d.counter("tunnel", name).unwrap()
}

#[test]
fn root_cross_node_traffic_goes_through_the_tunnel_intact() {
    let t = two_nodes("");
    let (code, body) = t.c.curl("client-a", &format!("http://{VIP}/")).unwrap();
    assert_eq!(code, 0, "{body}\n{}\n{}", t.a.log_text(), t.b.log_text());
    assert_eq!(field(&body, "backend"), "web-b");
    // The pod is reached from node-b's side (the tunnel's inbound end).
    assert!(field(&body, "peer").starts_with("10.244.2.1:"), "not through node-b's tunnel: {body}");

    const N: u64 = 4 * 1024 * 1024;
    let out =
        t.c.exec("client-a", "mt-pod", &["bulk", &format!("{ECHO_VIP}:9000"), &N.to_string()], Duration::from_secs(60))
            .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    assert_eq!(field(&text, "recv"), N.to_string(), "{text}");
    assert_eq!(field(&text, "sent_sum"), field(&text, "recv_sum"), "bytes changed in the tunnel: {text}");
    assert_eq!(tunnel(&t.b, "streams"), 2);
    assert_eq!(tunnel(&t.b, "handshakes"), 1, "one pooled connection carries both streams");
}

#[test]
fn root_the_wire_carries_no_plaintext_unless_mtls_is_disabled() {
    let t = two_nodes("");
    let marker = "MESH-MARKER-7f3a9c";
    let header = format!("X-Marker: {marker}");
    let url = format!("http://{VIP}/");
    let send = || {
        t.c.exec("client-a", "curl", &["-sS", "--max-time", "5", "-H", &header, &url], Duration::from_secs(10)).unwrap()
    };
    let (seen, out) = wire_contains(&t.c.fabric_netns(), marker.as_bytes(), send).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!seen, "the marker crossed the fabric in clear text with mtls: required");

    let plain = t.c.config(&services(&t.c, "    mtls: disabled\n"));
    let f = t.c.write_file("plain.yaml", &plain).unwrap();
    for node in ["node-a", "node-b"] {
        let o = t.c.meshctl(node, &["apply", "-f", f.to_str().unwrap()]).unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let (seen, out) = wire_contains(&t.c.fabric_netns(), marker.as_bytes(), send).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(seen, "with mtls: disabled the marker must be on the wire (else the capture sees nothing)");
}

#[test]
fn root_the_tunnel_refuses_plaintext_strangers_and_expired_certificates() {
    let t = two_nodes("");
    let tunnel_url = format!("https://{}:15008/", t.c.node("node-b").address);
    let failures = || tunnel(&t.b, "tls_failures");

    // Plaintext HTTP to the tunnel port.
    let plain_url = format!("http://{}:15008/", t.c.node("node-b").address);
    let o = t.c.exec("client-a", "curl", &["-sS", "--max-time", "5", &plain_url], Duration::from_secs(10)).unwrap();
    assert!(!o.status.success());
    assert!(mesh_tests::sys::wait_until(Duration::from_secs(3), || failures() == 1), "plaintext not counted");

    // A client certificate from another CA.
    let other = t.c.dir.join("other-ca");
    let o = std::process::Command::new(&t.c.bins.daemon).args(["ca", "init", "--out"]).arg(&other).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let id = "spiffe://cluster.local/ns/default/sa/client-a";
    let stranger = t.c.issue_cert(&other, id, 3600, "stranger").unwrap();
    let with_cert = |dir: &std::path::Path| {
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let args = [
            "-sSk",
            "--http2",
            "--max-time",
            "5",
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            &tunnel_url,
        ];
        t.c.exec("client-a", "curl", &args, Duration::from_secs(10)).unwrap()
    };
    assert!(!with_cert(&stranger).status.success());
    assert!(
        mesh_tests::sys::wait_until(Duration::from_secs(3), || failures() == 2),
        "another CA's certificate not counted"
    );

    // An expired certificate from the right CA.
    let expired = t.c.issue_cert(&t.c.ca_dir().unwrap(), id, 1, "expired").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(!with_cert(&expired).status.success());
    assert!(mesh_tests::sys::wait_until(Duration::from_secs(3), || failures() == 3), "expired certificate not counted");

    assert_eq!(tunnel(&t.b, "streams"), 0, "a refused peer reached a pod");
    let reasons = t.b.stats().unwrap()["tunnel"]["tls_failures_by_reason"].clone();
    assert_eq!(
        (reasons["plaintext"].as_u64(), reasons["untrusted_issuer"].as_u64(), reasons["expired"].as_u64()),
        (Some(1), Some(1), Some(1)),
        "{reasons}"
    );
    let (_, m) = t.b.admin_get("/metrics").unwrap();
    assert!(m.contains("mesh_tunnel_tls_failures_total{reason=\"expired\"} 1"), "{m}");
    let log = t.b.log_with("tunnel handshake refused", 3);
    assert_eq!(log.matches("tunnel handshake refused").count(), 3, "{log}");
    assert!(log.contains("expired"), "{log}");
}

#[test]
fn root_policy_denial_is_a_403_with_the_identities_logged() {
    let t = two_nodes("    authorization: { identities: [\"spiffe://cluster.local/ns/default/sa/someone-else\"] }\n");
    let (code, _) = t.c.curl("client-a", &format!("http://{VIP}/")).unwrap();
    assert_ne!(code, 0, "a denied identity got through");
    assert!(tunnel(&t.b, "denied_policy") >= 1);
    assert_eq!(tunnel(&t.b, "streams"), 0, "no connection to the pod");
    let log = t.b.log_with("authorization policy does not allow this identity", 1);
    assert!(
        log.contains("authorization policy does not allow this identity")
            && log.contains("spiffe://cluster.local/ns/default/sa/client-a"),
        "{log}"
    );
    // Another service without a policy still works for the same client.
    let out =
        t.c.exec("client-a", "mt-pod", &["bulk", &format!("{ECHO_VIP}:9000"), "1000"], Duration::from_secs(30))
            .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn root_connect_to_an_address_that_is_not_local_is_refused() {
    let c = Cluster::create(
        &ClusterSpec::new().node("node-a").node("node-b").pod("client-a", "node-a").pod("web-a", "node-a"),
    )
    .expect("mini cluster");
    c.serve("web-a", 8080, None).unwrap();
    // The state claims web-a is on node-b: node-b must refuse to relay.
    let wa = c.pod("web-a").ip;
    let svc = format!("  - name: web\n    vip: {VIP}\n    ports: [{{ port: 80, targetPort: 8080 }}]\n    endpoints: [{{ ip: {wa}, node: node-b }}]\n");
    let cfg = c.write_file("mesh.yaml", &c.config(&svc)).unwrap();
    let _a = c.start_daemon("node-a", &cfg, &[]).unwrap();
    let b = c.start_daemon("node-b", &cfg, &[]).unwrap();
    let (code, _) = c.curl("client-a", &format!("http://{VIP}/")).unwrap();
    assert_ne!(code, 0, "node-b relayed to an address that is not its workload");
    assert!(b.counter("tunnel", "denied_not_local").unwrap() >= 1);
    assert_eq!(b.counter("tunnel", "streams").unwrap(), 0);
    assert_eq!(b.counter("tunnel", "upstream_failures").unwrap(), 0, "a connection was attempted");
    assert!(b.log_with("is not a workload of this node; refused (403)", 1).contains("is not a workload of this node"));
}

#[test]
fn root_certificates_renew_without_breaking_new_or_open_connections() {
    let c = Cluster::create(
        &ClusterSpec::new().node("node-a").node("node-b").pod("client-a", "node-a").pod("web-b", "node-b"),
    )
    .expect("mini cluster");
    c.serve_with("web-b", 8080, None, &["--echo-now", "9100"]).unwrap();
    let web_b = c.pod("web-b").clone();
    assert!(mesh_tests::sys::wait_until(Duration::from_secs(5), || mesh_tests::sys::can_connect(
        &web_b.netns,
        web_b.addr(9100)
    )));
    let wb = web_b.ip;
    let svc = format!(
        "  - name: web\n    vip: {VIP}\n    ports: [{{ port: 80, targetPort: 8080 }}, {{ port: 9100 }}]\n    endpoints: [{{ ip: {wb}, node: node-b }}]\n"
    );
    let cfg = c.write_file("mesh.yaml", &c.config(&svc)).unwrap();
    // 20 s certificates: renewed at 14 s and again at 28 s.
    let a = c.start_daemon("node-a", &cfg, &["--cert-lifetime", "20s"]).unwrap();
    let b = c.start_daemon("node-b", &cfg, &["--cert-lifetime", "20s"]).unwrap();

    // One connection opened now, before the first renewal, streaming past the second.
    let long = c.start("client-a", "mt-pod", &["stream", &format!("{VIP}:9100"), "33"]).unwrap();
    let started = std::time::Instant::now();
    let mut new_ok = 0;
    while started.elapsed() < Duration::from_secs(32) {
        let (code, body) = c.curl("client-a", &format!("http://{VIP}/")).unwrap();
        assert_eq!(code, 0, "a new connection failed at {:?}: {body}\n{}", started.elapsed(), b.log_text());
        new_ok += 1;
        std::thread::sleep(Duration::from_secs(2));
    }
    let out = long.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "the connection opened before the first renewal broke: {text}");
    let renewed = |d: &Daemon, what: &str| d.log_with(what, 2).matches(what).count();
    eprintln!(
        "{new_ok} new connections ok; long connection: {}; node-b renewals: {}, client-a renewals: {}",
        text.trim(),
        renewed(&b, "node certificate renewed"),
        renewed(&a, "workload certificate renewed")
    );
    assert!(renewed(&b, "node certificate renewed") >= 2, "{}", b.log_text());
    assert!(renewed(&a, "workload certificate renewed") >= 2, "{}", a.log_text());
    assert!(
        b.counter("tunnel", "handshakes").unwrap() >= 3,
        "renewed client certificates were not used for new connections"
    );
}

/// Runs mt-tunnel in `pod` against `node`'s tunnel port with the
/// certificate in `cert`: CONNECT `target`, naming `service`. Returns its
/// output line (`status=… deny=… [reply=…]`).
fn probe(c: &Cluster, pod: &str, node: &str, cert: &std::path::Path, target: &str, service: Option<&str>) -> String {
    let tunnel = format!("{}:15008", c.node(node).address);
    let mut args = vec![tunnel.as_str(), cert.to_str().unwrap(), target];
    args.extend(service);
    let out = c.exec(pod, "mt-tunnel", &args, Duration::from_secs(15)).unwrap();
    assert!(out.status.success(), "mt-tunnel failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn root_the_tunnel_carries_only_service_traffic_to_service_endpoints() {
    let c = Cluster::create(
        &ClusterSpec::new()
            .node("node-a")
            .node("node-b")
            .pod("client-a", "node-a")
            .plain_pod("evil", "node-a")
            .pod("web-b", "node-b"),
    )
    .expect("mini cluster");
    // web-b answers HTTP on 8080 (the service's port) and echoes on 9090
    // (an admin port, no service's).
    c.serve_with("web-b", 8080, None, &["--echo-now", "9090"]).unwrap();
    let web_b = c.pod("web-b").clone();
    assert!(mesh_tests::sys::wait_until(Duration::from_secs(5), || mesh_tests::sys::can_connect(
        &web_b.netns,
        web_b.addr(9090)
    )));
    let svc = format!(
        "  - name: web\n    vip: {VIP}\n    ports: [{{ port: 80, targetPort: 8080 }}]\n    healthCheck: {{ protocol: none }}\n    \
         authorization: {{ identities: [\"spiffe://cluster.local/ns/default/sa/client-a\"] }}\n    endpoints: [{{ ip: {}, node: node-b }}]\n",
        web_b.ip
    );
    let cfg = c.write_file("mesh.yaml", &c.config(&svc)).unwrap();
    let _a = c.start_daemon("node-a", &cfg, &[]).unwrap();
    let b = c.start_daemon("node-b", &cfg, &[]).unwrap();

    // sa/evil holds a valid certificate of the trust domain.
    let evil = c.issue_cert(&c.ca_dir().unwrap(), "spiffe://cluster.local/ns/default/sa/evil", 3600, "evil").unwrap();
    let server = c.spawned_pid_of("web-b").unwrap();
    let before = mesh_tests::sys::tcp_inbound_attempts(server).unwrap();
    let ip = web_b.ip;
    let cases = [
        (format!("{ip}:8080"), Some("default/web"), "status=403 deny=policy"),
        (format!("{ip}:9090"), Some("default/web"), "status=403 deny=not-service-endpoint"),
        (format!("{ip}:22"), Some("default/web"), "status=403 deny=not-service-endpoint"),
        (format!("{ip}:9090"), None, "status=403 deny=not-service-endpoint"),
        (format!("{ip}:8080"), None, "status=403 deny=not-service-endpoint"),
    ];
    for (target, service, want) in &cases {
        let got = probe(&c, "evil", "node-b", &evil, target, *service);
        assert_eq!(&got, want, "CONNECT {target} naming {service:?} as sa/evil\n{}", b.log_text());
    }
    // Even sa/client-a, allowed on web, reaches no other port of web-b.
    let client =
        c.issue_cert(&c.ca_dir().unwrap(), "spiffe://cluster.local/ns/default/sa/client-a", 3600, "client").unwrap();
    let got = probe(&c, "evil", "node-b", &client, &format!("{ip}:9090"), Some("default/web"));
    assert_eq!(got, "status=403 deny=not-service-endpoint");

    let after = mesh_tests::sys::tcp_inbound_attempts(server).unwrap();
    assert_eq!(before, after, "a connection to web-b was attempted (PassiveOpens, OutRsts)");
    assert_eq!(tunnel(&b, "denied_policy"), 1);
    assert_eq!(tunnel(&b, "denied_not_endpoint"), 5);
    assert_eq!((tunnel(&b, "streams"), tunnel(&b, "upstream_failures")), (0, 0), "no connection attempted");
    let log = b.log_with("refused (403)", 6);
    assert!(
        log.contains("spiffe://cluster.local/ns/default/sa/evil")
            && log.contains("spiffe://cluster.local/ns/default/sa/web-b"),
        "the refusal names both identities: {log}"
    );

    // sa/client-a still reaches web through the mesh (its node's proxy).
    let (code, body) = c.curl("client-a", &format!("http://{VIP}/")).unwrap();
    assert_eq!(code, 0, "{body}\n{}", b.log_text());
    assert_eq!(field(&body, "backend"), "web-b");
    // The same CONNECT with its stolen certificate, from a pod rather than
    // from node-a (where the state places client-a): refused.
    let got = probe(&c, "evil", "node-b", &client, &format!("{ip}:8080"), Some("default/web"));
    assert_eq!(got, "status=403 deny=wrong-node", "{}", b.log_text());
    assert_eq!(tunnel(&b, "denied_wrong_node"), 1);
    let log = b.log_with("the one the stream came from", 1);
    assert!(log.contains("spiffe://cluster.local/ns/default/sa/client-a") && log.contains("from=10.244.1."), "{log}");
}

#[test]
fn root_refused_clients_do_not_eject_endpoints_for_others() {
    let c = Cluster::create(
        &ClusterSpec::new()
            .node("node-a")
            .node("node-b")
            .pod("client-a", "node-a")
            .pod("client-b", "node-a")
            .pod("web-b1", "node-b")
            .pod("web-b2", "node-b"),
    )
    .expect("mini cluster");
    c.serve("web-b1", 8080, None).unwrap();
    c.serve("web-b2", 8080, None).unwrap();
    // Only client-a may use web; no active checks, so only the breaker
    // could take the endpoints out, and without fail-open nothing is
    // left once it has.
    let svc = format!(
        "  - name: web\n    vip: {VIP}\n    ports: [{{ port: 80, targetPort: 8080 }}]\n    failOpen: false\n    healthCheck: {{ protocol: none }}\n    \
         authorization: {{ identities: [\"spiffe://cluster.local/ns/default/sa/client-a\"] }}\n    \
         endpoints: [{{ ip: {}, node: node-b }}, {{ ip: {}, node: node-b }}]\n",
        c.pod("web-b1").ip,
        c.pod("web-b2").ip
    );
    let cfg = c.write_file("mesh.yaml", &c.config(&svc)).unwrap();
    let a = c.start_daemon("node-a", &cfg, &[]).unwrap();
    let b = c.start_daemon("node-b", &cfg, &[]).unwrap();
    let url = format!("http://{VIP}/");

    for i in 0..20 {
        let (code, body) = c.curl("client-b", &url).unwrap();
        assert_ne!(code, 0, "denied client-b got through on try {i}: {body}");
    }
    assert_eq!(a.counter("proxy", "refused").unwrap(), 20, "{}", a.log_text());
    assert_eq!(a.counter("proxy", "retries").unwrap(), 0, "a refusal was retried on another endpoint");
    assert_eq!(a.counter("proxy", "connect_failed").unwrap(), 0);
    assert_eq!(tunnel(&b, "denied_policy"), 20);
    let out = c.meshctl("node-a", &["get", "endpoints", "-o", "json"]).unwrap();
    let eps: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let breakers: Vec<&str> = eps.as_array().unwrap().iter().map(|e| e["breaker"].as_str().unwrap()).collect();
    assert_eq!(breakers, ["closed", "closed"], "{eps:#}");
    let log = a.log_with("outcome=\"denied\"", 20);
    assert!(log.contains("outcome=\"denied\"") || log.contains("outcome=denied"), "{log}");

    for i in 0..50 {
        let (code, body) = c.curl("client-a", &url).unwrap();
        assert_eq!(code, 0, "client-a failed on try {i} after client-b's refusals: {body}\n{}", a.log_text());
    }
}
