//! Node-bound identity (root, real kernel): an issuer in its own network
//! namespace holds the CA key; the node daemons hold only the trust bundle
//! and a credential, send CSRs, and get only their own node's and their
//! workloads' identities.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use mesh_tests::{Cluster, ClusterSpec, Daemon};

const ECHO_VIP: &str = "10.96.0.11";
const WEB_VIP: &str = "10.96.0.12";

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
        "  - name: echo\n    vip: {ECHO_VIP}\n    ports: [{{ port: 9000 }}]\n    endpoints: [{{ ip: {ip}, node: node-b }}]\n\
         \x20 - name: web\n    vip: {WEB_VIP}\n    ports: [{{ port: 80, targetPort: 8080 }}]\n    endpoints: [{{ ip: {ip}, node: node-b }}]\n",
        ip = c.pod("web-2").ip
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

/// A counter of the issuer's `/metrics`, read from node-a's namespace.
fn issuer_counter(c: &Cluster, issuer: &str, name: &str) -> u64 {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", c.node("node-a").netns.display()))
        .args(["curl", "-sk", "--max-time", "5", &format!("https://{issuer}/metrics")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {name} in the issuer's metrics: {text}"))
}

#[test]
fn root_a_hundred_connections_racing_for_a_new_workload_identity_cause_one_csr() {
    let (c, cfg, token_a, token_b) = cluster();
    let issuer = format!("{}:15012", c.node("issuer").address);
    start_issuer(&c, &cfg, &issuer);
    let flags = |token: &Path| ["--issuer", &issuer, "--issuer-token", token.to_str().unwrap()].map(str::to_owned);
    let (fa, fb) = (flags(&token_a), flags(&token_b));
    let a = c.start_daemon("node-a", &cfg, &fa.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    let b = c.start_daemon("node-b", &cfg, &fb.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    let before = issuer_counter(&c, &issuer, "mesh_issuer_issued_total");
    assert_eq!(before, 2, "each node's own certificate, nothing else yet");
    // The client pod has no certificate yet: 100 connections to a service
    // on node-b need one at once, and wait for the same request.
    let out =
        c.exec("client", "mt-pod", &["concurrent", &format!("{WEB_VIP}:80"), "100"], Duration::from_secs(60)).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("ok=100 failed=0"), "{text}\n{}\n{}", a.log_text(), b.log_text());
    assert_eq!(issuer_counter(&c, &issuer, "mesh_issuer_issued_total"), 3, "one CSR for the client's identity");
    let issued = a
        .log_text()
        .matches("workload certificate issued identity=spiffe://cluster.local/ns/default/sa/client")
        .count();
    assert_eq!(issued, 1, "{}", a.log_text());
}

/// Starts `mesh-daemon ca serve` at `addr` in the issuer's namespace,
/// with bootstrap credentials and the state in `cfg`, 30 s certificates.
fn start_issuer(c: &Cluster, cfg: &Path, addr: &str) -> u32 {
    let creds = c.dir.join("credentials.json");
    let args = ["--credentials", creds.to_str().unwrap(), "--config", cfg.to_str().unwrap(), "--seconds", "30"];
    spawn_issuer(c, addr, &args, &[])
}

/// Starts `mesh-daemon ca serve` at `addr` in the issuer's namespace with
/// this run's CA, more `args` and `env`, and waits until it listens; its pid.
fn spawn_issuer(c: &Cluster, addr: &str, args: &[&str], env: &[String]) -> u32 {
    let ca = c.ca_dir().unwrap();
    let (cert, key) = (ca.join("ca.pem"), ca.join("ca.key"));
    let daemon = c.bins.daemon.to_string_lossy().into_owned();
    let mut all: Vec<&str> = env.iter().map(String::as_str).collect();
    all.extend([daemon.as_str(), "ca", "serve", "--listen", addr]);
    all.extend(["--ca-cert", cert.to_str().unwrap(), "--ca-key", key.to_str().unwrap()]);
    all.extend(args);
    let pid = c.spawn_on_node("issuer", "/usr/bin/env", &all).unwrap();
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

mod kubernetes {
    //! The issuer with `--kubernetes` against the stand-in API server: nodes
    //! present projected service-account tokens (TokenReview), and a pod's
    //! identity goes only to the daemon of the node its `spec.nodeName` names.

    use std::ffi::OsStr;
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use mesh_tests::fake_kube::{FakeApiServer, Token};
    use mesh_tests::sys::wait_until;
    use mesh_tests::{Cluster, ClusterSpec};
    use serde_json::{json, Value};

    use super::request;

    const VIP: &str = "10.96.0.60";
    const CLIENT_UID: &str = "7a2b3c10-0000-4000-8000-00000000c001";
    const WEB_UID: &str = "7a2b3c10-0000-4000-8000-00000000e001";
    const DAEMON_ACCOUNT: &str = "system:serviceaccount:mesh-system:mesh-daemon";

    fn pod(c: &Cluster, ns: &str, name: &str, uid: &str, node: &str, sa: &str, ip: &str) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": name, "namespace": ns, "uid": uid },
            "spec": { "nodeName": node, "serviceAccountName": sa, "containers": [{ "name": "c", "image": "x" }] },
            "status": { "phase": "Running", "podIP": ip, "hostIP": c.node(node).address.to_string() },
        })
    }

    fn objects(c: &Cluster) -> Vec<Value> {
        let (client, web) = (c.pod("client"), c.pod("web"));
        let mut daemons: Vec<Value> = ["node-a", "node-b"]
            .iter()
            .map(|n| {
                let addr = c.node(n).address.to_string();
                let mut p =
                    pod(c, "mesh-system", &format!("mesh-daemon-{n}"), &format!("uid-{n}"), n, "mesh-daemon", &addr);
                p["spec"]["hostNetwork"] = json!(true);
                p
            })
            .collect();
        let mut v = vec![
            json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": "mesh-system" } }),
            json!({ "apiVersion": "v1", "kind": "Namespace",
                    "metadata": { "name": "shop", "labels": { "mesh.io/inject": "enabled" } } }),
            json!({ "apiVersion": "v1", "kind": "Service", "metadata": { "name": "web", "namespace": "shop" },
                    "spec": { "type": "ClusterIP", "clusterIP": VIP, "clusterIPs": [VIP],
                              "ports": [{ "name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080 }] } }),
            json!({ "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": { "name": "web-x1", "namespace": "shop",
                                  "labels": { "kubernetes.io/service-name": "web" } },
                    "addressType": "IPv4", "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
                    "endpoints": [{ "addresses": [web.ip.to_string()], "conditions": { "ready": true },
                                    "nodeName": "node-b", "targetRef": { "kind": "Pod", "namespace": "shop", "name": "web" } }] }),
            pod(c, "shop", "client", CLIENT_UID, "node-a", "shopper", &client.ip.to_string()),
            pod(c, "shop", "web", WEB_UID, "node-b", "web", &web.ip.to_string()),
        ];
        v.append(&mut daemons);
        // Two routes on shop/web: one whose backend exists, one (for
        // /dangling only: its requests are answered 500) whose does not.
        for (name, backend, prefix) in [("good", "web", "/"), ("dangling", "gone", "/dangling")] {
            v.push(json!({ "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                "metadata": { "name": name, "namespace": "shop", "generation": 1 },
                "spec": { "parentRefs": [{ "name": "web", "port": 80 }],
                          "rules": [{ "matches": [{ "path": { "type": "PathPrefix", "value": prefix } }],
                                      "backendRefs": [{ "name": backend, "port": 80 }] }] } }));
        }
        v
    }

    fn token(c: &Cluster, api: &FakeApiServer, name: &str, t: Token) -> PathBuf {
        // Opaque to the issuer, as a JWT is: only the API server reads it.
        let text = format!("eyJ.{name}.{}", std::process::id());
        api.add_token(&text, t);
        c.write_file(&format!("{name}.jwt"), &text).unwrap()
    }

    fn daemon_token(pod: &str, uid: &str, node: Option<&str>) -> Token {
        Token {
            username: DAEMON_ACCOUNT.into(),
            audiences: vec!["mesh-issuer".into()],
            pod: Some((pod.into(), uid.into())),
            node: node.map(str::to_owned),
        }
    }

    /// Starts `ca serve --kubernetes` at `addr` in the issuer's namespace.
    fn start_issuer(c: &Cluster, addr: &str, kubeconfig: &Path) -> u32 {
        let env = [format!("KUBECONFIG={}", kubeconfig.display()), "RUST_LOG=info".into()];
        super::spawn_issuer(c, addr, &["--kubernetes", "--seconds", "60"], &env)
    }

    fn refused(text: &str, status: &str, reason: &str) -> bool {
        text.contains(status) && text.contains(reason)
    }

    #[test]
    fn root_kubernetes_a_pod_gets_its_certificate_only_through_its_nodes_daemon() {
        let c = Cluster::create(
            &ClusterSpec::new()
                .node("node-a")
                .node("node-b")
                .node("issuer")
                .kube_pod("client", "node-a", CLIENT_UID)
                .kube_pod("web", "node-b", WEB_UID),
        )
        .expect("mini cluster");
        c.serve("web", 8080, None).unwrap();
        c.spawn("client", Path::new("/bin/sleep"), &["600"]).unwrap();
        let issuer_node = c.node("issuer").clone();
        let api = FakeApiServer::start(&issuer_node.netns, issuer_node.address, objects(&c)).unwrap();
        api.install_gateway_api();
        let kubeconfig = api.kubeconfig(&c.dir).unwrap();
        // node-a's token says its node (Kubernetes 1.32+); node-b's does
        // not (older servers): the issuer reads the bound pod either way.
        let tok_a = token(&c, &api, "node-a", daemon_token("mesh-daemon-node-a", "uid-node-a", Some("node-a")));
        let tok_b = token(&c, &api, "node-b", daemon_token("mesh-daemon-node-b", "uid-node-b", None));
        let issuer = format!("{}:15012", issuer_node.address);
        start_issuer(&c, &issuer, &kubeconfig);

        let env = [("KUBECONFIG", kubeconfig.as_os_str()), ("RUST_LOG", OsStr::new("info"))];
        let start = |node: &str, tok: &Path| {
            let t = tok.to_str().unwrap();
            let flags = ["--kubernetes", "--issuer", &issuer, "--issuer-token", t, "--cert-lifetime", "60s"];
            c.start_daemon_with(node, None, &flags, &env).unwrap()
        };
        let (a, b) = (start("node-a", &tok_a), start("node-b", &tok_b));
        for d in [&a, &b] {
            assert_eq!(super::holds_ca_key(d), None, "a node daemon holds the CA key");
        }

        // The client on node-a reaches web on node-b through the tunnel,
        // with node-a's daemon holding the client's certificate from the
        // issuer.
        let reached = wait_until(Duration::from_secs(20), || {
            c.curl("client", &format!("http://{VIP}/")).is_ok_and(|(code, body)| code == 0 && body.contains("web"))
        });
        assert!(reached, "{}\n{}", a.log_text(), b.log_text());
        assert!(b.counter("tunnel", "streams").unwrap() >= 1);
        let issued = a.log_with("workload certificate issued identity=spiffe://cluster.local/ns/shop/sa/shopper", 1);
        assert!(issued.contains("workload certificate issued"), "{issued}");
        let issuer_log = || std::fs::read_to_string(c.dir.join("node-issuer.log")).unwrap_or_default();
        let by_issuer = wait_until(Duration::from_secs(5), || {
            issuer_log().contains("caller=node-a identity=spiffe://cluster.local/ns/shop/sa/shopper")
        });
        assert!(by_issuer, "{}", issuer_log());

        // Route status: the issuer, one per cluster, writes it; the two
        // node daemons, which route by the same objects, do not.
        let parents = |name: &str| {
            api.get("gateway.networking.k8s.io/v1", "HTTPRoute", "shop", name)
                .and_then(|o| o["status"]["parents"].as_array().cloned())
                .unwrap_or_default()
        };
        let written =
            wait_until(Duration::from_secs(10), || !parents("good").is_empty() && !parents("dangling").is_empty());
        assert!(written, "{}", issuer_log());
        std::thread::sleep(Duration::from_secs(2)); // every component has seen the written status
        let patches = |name: &str| {
            let path = format!("/httproutes/{name}/status");
            api.requests().iter().filter(|r| r.starts_with("PATCH") && r.contains(&path)).count()
        };
        assert_eq!((patches("good"), patches("dangling")), (1, 1), "once per route, not once per node");
        let cond = |name: &str, kind: &str| -> (String, String) {
            let p = parents(name);
            let c = p[0]["conditions"].as_array().unwrap().iter().find(|c| c["type"] == kind).unwrap().clone();
            (c["status"].as_str().unwrap().to_owned(), c["reason"].as_str().unwrap().to_owned())
        };
        assert_eq!(parents("good")[0]["controllerName"], "mesh.io/mesh");
        assert_eq!(cond("good", "Accepted"), ("True".into(), "Accepted".into()));
        assert_eq!(cond("good", "ResolvedRefs"), ("True".into(), "ResolvedRefs".into()));
        assert_eq!(cond("dangling", "Accepted"), ("True".into(), "Accepted".into()));
        assert_eq!(cond("dangling", "ResolvedRefs"), ("False".into(), "BackendNotFound".into()));

        let ask = |tok: &Path, id: &str| request(&c, &issuer, tok, id);
        let shopper = "spiffe://cluster.local/ns/shop/sa/shopper";
        let web = "spiffe://cluster.local/ns/shop/sa/web";
        let (ok, text) = ask(&tok_a, shopper);
        assert!(ok, "{text}");
        let (ok, text) = ask(&tok_b, web);
        assert!(ok, "{text}");
        let (ok, text) = ask(&tok_a, web);
        assert!(!ok && refused(&text, "403", "not_on_node"), "web runs on node-b: {text}");
        let (ok, text) = ask(&tok_b, shopper);
        assert!(!ok && refused(&text, "403", "not_on_node"), "{text}");
        let (ok, text) = ask(&tok_a, "spiffe://cluster.local/ns/mesh-system/node/node-b");
        assert!(!ok && refused(&text, "403", "other_node"), "{text}");

        // A workload's own token, or a daemon token minted for another
        // audience, gets nothing.
        let workload = Token {
            username: "system:serviceaccount:shop:shopper".into(),
            audiences: vec!["mesh-issuer".into()],
            pod: Some(("client".into(), CLIENT_UID.into())),
            node: None,
        };
        let tok_w = token(&c, &api, "workload", workload);
        let (ok, text) = ask(&tok_w, "spiffe://cluster.local/ns/mesh-system/node/node-a");
        assert!(!ok && refused(&text, "403", "not_node_account"), "{text}");
        let mut other = daemon_token("mesh-daemon-node-a", "uid-node-a", None);
        other.audiences = vec!["https://kubernetes.default.svc.cluster.local".into()];
        let tok_aud = token(&c, &api, "audience", other);
        let (ok, text) = ask(&tok_aud, shopper);
        assert!(!ok && refused(&text, "401", "audience"), "{text}");

        // A pod newly scheduled on node-a: its identity goes to node-a's
        // daemon from then on, never to node-b's.
        let late = "spiffe://cluster.local/ns/shop/sa/late";
        let (ok, text) = ask(&tok_a, late);
        assert!(!ok && refused(&text, "403", "not_on_node"), "not scheduled yet: {text}");
        api.put(pod(&c, "shop", "late", "7a2b3c10-0000-4000-8000-0000000000aa", "node-a", "late", "10.244.1.77"))
            .unwrap();
        let (ok, text) = ask(&tok_a, late);
        assert!(ok, "scheduled on node-a: {text}");
        let (ok, text) = ask(&tok_b, late);
        assert!(!ok && refused(&text, "403", "not_on_node"), "{text}");

        // node-a's daemon pod replaced: the old pod's token is void.
        api.edit("v1", "Pod", "mesh-system", "mesh-daemon-node-a", |p| {
            p["metadata"]["uid"] = json!("uid-node-a-2");
        })
        .unwrap();
        let (ok, text) = ask(&tok_a, shopper);
        assert!(!ok && refused(&text, "401", "replaced"), "{text}");

        // The API server down: the issuer cannot decide, says so (503: a
        // node tries another replica, or again later) and refuses nothing.
        api.set_down(true);
        let (ok, text) = ask(&tok_b, web);
        assert!(!ok && text.contains("503") && text.contains("cannot decide now"), "{text}");
        api.set_down(false);
        assert!(ask(&tok_b, web).0, "the API server back");

        // Each refusal counted by reason, and logged with the caller.
        let metrics = mesh_tests::sys::in_netns(&c.node("node-a").netns, || {
            std::process::Command::new("curl").args(["-sk", &format!("https://{issuer}/metrics")]).output()
        })
        .unwrap()
        .unwrap();
        let metrics = String::from_utf8_lossy(&metrics.stdout).into_owned();
        for (reason, n) in [("not_on_node", 4), ("other_node", 1), ("not_node_account", 1), ("unauthenticated", 2)] {
            let line = format!("mesh_issuer_refused_total{{reason=\"{reason}\"}} {n}\n");
            assert!(metrics.contains(&line), "{line}in\n{metrics}");
        }
        assert!(metrics.contains("mesh_issuer_unavailable_total 1\n"), "{metrics}");
        let logged =
            wait_until(Duration::from_secs(5), || issuer_log().matches("certificate refused (403)").count() == 6);
        assert!(logged, "{}", issuer_log());
        assert!(issuer_log()
            .contains("caller=node-b identity=spiffe://cluster.local/ns/shop/sa/late reason=\"not_on_node\""));
    }
}
