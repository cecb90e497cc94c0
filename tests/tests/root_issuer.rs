//! Node-bound identity (root, real kernel): an issuer in its own network
//! namespace holds the CA key; the node daemons hold only the trust bundle
//! and a credential, send CSRs, and get only their own node's and their
//! workloads' identities.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use mesh_tests::{Cluster, ClusterSpec, Daemon};

const ECHO_VIP: &str = "10.96.0.11";

/// What `mesh-daemon ca request` says when node credential `token` asks
/// the issuer for `id`: (succeeded, output).
fn request(c: &Cluster, issuer: &str, token: &Path, id: &str) -> (bool, String) {
    let ca = c.ca_dir().unwrap();
    // The issuer's address is on the fabric: ask from node-a's namespace.
    let out = Command::new("nsenter")
        .arg(format!("--net={}", c.node("node-a").netns.display()))
        .arg(&c.bins.daemon)
        .args(["ca", "request", "--issuer", issuer, "--token"])
        .arg(token)
        .arg("--trust-bundle")
        .arg(ca.join("ca.pem"))
        .args(["--id", id])
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Whether anything the daemon was started with, or has open, names the CA key.
fn holds_ca_key(d: &Daemon) -> Option<String> {
    let pid = d.pid();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    for (what, bytes) in [("command line", cmdline), ("environment", environ)] {
        let text = String::from_utf8_lossy(&bytes).replace('\0', " ");
        if text.contains("ca.key") || text.contains("PRIVATE KEY") {
            return Some(format!("{what}: {text}"));
        }
    }
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).into_iter().flatten().flatten() {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            if target.to_string_lossy().contains("ca.key") {
                return Some(format!("open file {}", target.display()));
            }
        }
    }
    None
}

fn bulk(c: &Cluster) -> bool {
    let out =
        c.exec("client", "mt-pod", &["bulk", &format!("{ECHO_VIP}:9000"), "4096"], Duration::from_secs(20)).unwrap();
    out.status.success()
}

/// node-a with the client pod, node-b with web-2 (echo on 9000, the
/// `echo` service), and a node-sized namespace for issuers; the config and
/// both nodes' credentials.
fn cluster() -> (Cluster, std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let c = Cluster::create(
        &ClusterSpec::new().node("node-a").node("node-b").node("issuer").pod("client", "node-a").pod("web-2", "node-b"),
    )
    .expect("mini cluster");
    c.serve("web-2", 8080, Some(9000)).unwrap();
    let svc = format!(
        "  - name: echo\n    vip: {ECHO_VIP}\n    ports: [{{ port: 9000 }}]\n    endpoints: [{{ ip: {}, node: node-b }}]\n",
        c.pod("web-2").ip
    );
    let cfg = c.write_file("mesh.yaml", &c.config(&svc)).unwrap();
    let (token_a, token_b) = (c.bootstrap_node("node-a").unwrap(), c.bootstrap_node("node-b").unwrap());
    (c, cfg, token_a, token_b)
}

#[test]
fn root_nodes_get_certificates_only_for_themselves_from_the_issuer_and_hold_no_ca_key() {
    let (c, cfg, token_a, token_b) = cluster();
    let issuer = format!("{}:15012", c.node("issuer").address);
    let issuer_pid = start_issuer(&c, &cfg, &issuer);
    let flags = |token: &Path| {
        vec![
            "--issuer".to_owned(),
            issuer.clone(),
            "--issuer-token".to_owned(),
            token.to_str().unwrap().to_owned(),
            "--cert-lifetime".to_owned(),
            "30s".to_owned(),
        ]
    };
    let (fa, fb) = (flags(&token_a), flags(&token_b));
    let a = c.start_daemon("node-a", &cfg, &fa.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    let b = c.start_daemon("node-b", &cfg, &fb.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();

    // Traffic crosses the tunnel with certificates from the issuer.
    assert!(bulk(&c), "{}\n{}", a.log_text(), b.log_text());
    assert!(b.counter("tunnel", "streams").unwrap() >= 1);
    assert!(a.log_text().contains("certificates come from the issuer"));
    for d in [&a, &b] {
        assert_eq!(holds_ca_key(d), None, "a node daemon holds the CA key");
    }

    // A node gets nothing but its own: not another node, not a workload
    // of another node; a caller without a valid credential gets nothing.
    let (ok, text) = request(&c, &issuer, &token_a, "spiffe://cluster.local/ns/default/sa/client");
    assert!(ok, "node-a's own workload: {text}");
    let (ok, text) = request(&c, &issuer, &token_a, "spiffe://cluster.local/ns/mesh-system/node/node-b");
    assert!(!ok && text.contains("403") && text.contains("other_node"), "{text}");
    let (ok, text) = request(&c, &issuer, &token_a, "spiffe://cluster.local/ns/default/sa/web-2");
    assert!(!ok && text.contains("not_on_node"), "web-2 runs on node-b: {text}");
    let guess = c.write_file("guess.token", "0123456789abcdef").unwrap();
    let (ok, text) = request(&c, &issuer, &guess, "spiffe://cluster.local/ns/mesh-system/node/node-a");
    assert!(!ok && text.contains("401"), "{text}");
    // Each refusal logged with the caller (the log is written in batches).
    let log = || std::fs::read_to_string(c.dir.join("node-issuer.log")).unwrap_or_default();
    let logged = mesh_tests::sys::wait_until(Duration::from_secs(5), || {
        let l = log();
        l.matches("certificate refused (403)").count() == 2 && l.matches("without a valid node credential").count() == 1
    });
    assert!(logged, "{}", log());
    assert!(log()
        .contains("caller=node-a identity=spiffe://cluster.local/ns/mesh-system/node/node-b reason=\"other_node\""));

    // The issuer is down for longer than the renewal point (15 s of 30):
    // traffic and new connections go on; back, renewal resumes.
    c.kill(issuer_pid);
    std::thread::sleep(Duration::from_secs(18));
    assert!(bulk(&c), "{}", a.log_text());
    assert!(a.log_text().contains("renewing a certificate failed"), "{}", a.log_text());
    start_issuer(&c, &cfg, &issuer);
    let renewed = mesh_tests::sys::wait_until(Duration::from_secs(10), || {
        a.log_text().contains("node certificate renewed") && b.log_text().contains("node certificate renewed")
    });
    assert!(renewed, "{}\n{}", a.log_text(), b.log_text());
    assert!(bulk(&c));
}

/// Starts `mesh-daemon ca serve` at `addr` in the issuer's namespace and
/// waits until it listens; its pid.
fn start_issuer(c: &Cluster, cfg: &Path, addr: &str) -> u32 {
    let ca = c.ca_dir().unwrap();
    let (cert, key, creds) = (ca.join("ca.pem"), ca.join("ca.key"), c.dir.join("credentials.json"));
    let args = [
        "ca",
        "serve",
        "--listen",
        addr,
        "--ca-cert",
        cert.to_str().unwrap(),
        "--ca-key",
        key.to_str().unwrap(),
        "--credentials",
        creds.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
        "--seconds",
        "30",
    ];
    let pid = c.spawn_on_node("issuer", &c.bins.daemon.to_string_lossy(), &args).unwrap();
    let netns = c.node("issuer").netns.clone();
    let sock: std::net::SocketAddr = addr.parse().unwrap();
    assert!(mesh_tests::sys::wait_until(Duration::from_secs(10), || mesh_tests::sys::can_connect(&netns, sock)));
    pid
}

#[test]
fn root_with_two_issuers_a_node_renews_from_the_one_that_is_up() {
    let (c, cfg, token_a, token_b) = cluster();
    let ip = c.node("issuer").address;
    let (one, two) = (format!("{ip}:15012"), format!("{ip}:15013"));
    let first = start_issuer(&c, &cfg, &one);
    start_issuer(&c, &cfg, &two);
    let flags = |token: &Path| {
        let t = token.to_str().unwrap().to_owned();
        ["--issuer", &one, "--issuer", &two, "--issuer-token", &t, "--cert-lifetime", "30s"].map(str::to_owned)
    };
    let (fa, fb) = (flags(&token_a), flags(&token_b));
    let a = c.start_daemon("node-a", &cfg, &fa.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    let b = c.start_daemon("node-b", &cfg, &fb.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    assert!(bulk(&c), "{}\n{}", a.log_text(), b.log_text());

    // The first issuer goes away for good: past the renewal point the
    // nodes renew from the second, and nothing fails on the way.
    c.kill(first);
    let renewed = mesh_tests::sys::wait_until(Duration::from_secs(25), || {
        a.log_text().contains("node certificate renewed") && b.log_text().contains("node certificate renewed")
    });
    assert!(renewed, "{}\n{}", a.log_text(), b.log_text());
    assert!(!a.log_text().contains("renewing a certificate failed"), "{}", a.log_text());
    assert!(bulk(&c));
}
