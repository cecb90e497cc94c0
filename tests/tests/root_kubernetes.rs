//! Kubernetes discovery end to end (root, real kernel): the daemon runs
//! with `--kubernetes` against a stand-in API server (tests/src/fake_kube.rs)
//! and must enroll the pods it finds by their cgroup, balance the Service
//! it lists, follow changes, refuse control-API writes, and keep its state
//! through an API-server outage.

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use mesh_tests::fake_kube::FakeApiServer;
use mesh_tests::sys::wait_until;
use mesh_tests::{Cluster, ClusterSpec, Daemon};
use serde_json::{json, Value};

const VIP: &str = "10.96.0.50";

// The tests' pods share UIDs, by which each daemon finds pod processes in
// every cgroup of the machine: one cluster at a time.
use mesh_tests::one_at_a_time as serial;
const CLIENT_UID: &str = "6f1c2a10-0000-4000-8000-00000000c001";
const WEB1_UID: &str = "6f1c2a10-0000-4000-8000-00000000e001";
const WEB2_UID: &str = "6f1c2a10-0000-4000-8000-00000000e002";

fn pod(c: &Cluster, name: &str, uid: &str, sa: &str, weight: Option<&str>) -> Value {
    let p = c.pod(name);
    let mut o = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": "shop", "uid": uid, "labels": { "app": name } },
        "spec": { "nodeName": p.node, "serviceAccountName": sa, "containers": [{ "name": "c", "image": "x" }] },
        "status": { "phase": "Running", "podIP": p.ip.to_string(), "hostIP": c.node(&p.node).address.to_string() },
    });
    if let Some(w) = weight {
        o["metadata"]["annotations"] = json!({ "mesh.io/weight": w });
    }
    o
}

fn endpoint(c: &Cluster, name: &str, ready: bool, terminating: bool) -> Value {
    let p = c.pod(name);
    json!({
        "addresses": [p.ip.to_string()],
        "conditions": { "ready": ready, "serving": ready || terminating, "terminating": terminating },
        "nodeName": p.node,
        "targetRef": { "kind": "Pod", "namespace": "shop", "name": name },
    })
}

fn objects(c: &Cluster) -> Vec<Value> {
    vec![
        json!({ "apiVersion": "v1", "kind": "Namespace",
                "metadata": { "name": "shop", "labels": { "mesh.io/inject": "enabled" } } }),
        json!({ "apiVersion": "v1", "kind": "Service",
                "metadata": { "name": "web", "namespace": "shop" },
                "spec": { "type": "ClusterIP", "clusterIP": VIP, "clusterIPs": [VIP],
                          "ports": [{ "name": "http", "port": 80, "protocol": "TCP", "targetPort": "http" }] } }),
        json!({ "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": { "name": "web-abcde", "namespace": "shop",
                              "labels": { "kubernetes.io/service-name": "web" } },
                "addressType": "IPv4",
                "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
                "endpoints": [endpoint(c, "web-1", true, false), endpoint(c, "web-2", true, false)] }),
        pod(c, "client", CLIENT_UID, "shopper", None),
        pod(c, "web-1", WEB1_UID, "web", Some("3")),
        pod(c, "web-2", WEB2_UID, "web", None),
        // Running by the API, but no process of it is on the node (yet).
        json!({ "apiVersion": "v1", "kind": "Pod",
                "metadata": { "name": "ghost", "namespace": "shop", "uid": "6f1c2a10-0000-4000-8000-0000000000ff" },
                "spec": { "nodeName": "node-a", "containers": [{ "name": "c", "image": "x" }] },
                "status": { "phase": "Running", "podIP": "10.244.1.99", "hostIP": c.node("node-a").address.to_string() } }),
    ]
}

/// The daemon's accepted state (its config dump).
fn state(d: &Daemon) -> Value {
    d.admin_get("/config_dump").ok().and_then(|(_, b)| serde_json::from_str::<Value>(&b).ok()).unwrap_or_default()
        ["state"]
        .clone()
}

/// (ip, weight) of shop/web's endpoints in the daemon's state.
fn web_endpoints(d: &Daemon) -> Vec<(String, i64)> {
    let s = state(d);
    let Some(web) = s["services"].as_array().and_then(|v| v.iter().find(|s| s["name"] == "web")) else {
        return Vec::new();
    };
    web["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| (e["ip"].as_str().unwrap_or_default().to_owned(), e["weight"].as_i64().unwrap_or(1)))
        .collect()
}

fn eventually(d: &Daemon, what: &str, mut f: impl FnMut() -> bool) {
    assert!(wait_until(Duration::from_secs(20), &mut f), "{what}; state: {}\nlog:\n{}", state(d), d.log_text());
}

/// Node-a with the client and web-1, web-2 (HTTP on 8080) as the API
/// server's pods, each with a process by which the daemon finds its
/// network namespace.
fn cluster() -> Cluster {
    cluster_of(mesh_tests::Stack::Ipv4)
}

/// [`cluster`] with nodes and pods of `stack`.
fn cluster_of(stack: mesh_tests::Stack) -> Cluster {
    let c = Cluster::create(
        &ClusterSpec::new()
            .stack(stack)
            .node("node-a")
            .kube_pod("client", "node-a", CLIENT_UID)
            .kube_pod("web-1", "node-a", WEB1_UID)
            .kube_pod("web-2", "node-a", WEB2_UID),
    )
    .unwrap();
    c.serve("web-1", 8080, None).unwrap();
    c.serve("web-2", 8080, None).unwrap();
    c.spawn("client", Path::new("/bin/sleep"), &["600"]).unwrap();
    c
}

#[test]
fn root_kubernetes_discovery_enrolls_balances_follows_and_survives_an_outage() {
    let _one = serial();
    let c = cluster();
    let (ip1, ip2) = (c.pod("web-1").ip.to_string(), c.pod("web-2").ip.to_string());

    let api = FakeApiServer::start(&c.node("node-a").netns, "127.0.0.1".parse().unwrap(), objects(&c)).unwrap();
    let kubeconfig = api.kubeconfig(&c.dir).unwrap();
    let env = [("KUBECONFIG", kubeconfig.as_os_str()), ("RUST_LOG", OsStr::new("info"))];
    let d = c.start_daemon_with("node-a", None, &["--kubernetes", "--log-format", "json"], &env).unwrap();

    // Listed and translated: the VIP with both endpoints and web-1's
    // annotated weight, and the three pods enrolled with their accounts.
    eventually(&d, "shop/web with weights 3 and 1", || web_endpoints(&d) == [(ip1.clone(), 3), (ip2.clone(), 1)]);
    let s = state(&d);
    let mut enrolled: Vec<(String, String)> = s["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["name"].as_str().unwrap().to_owned(), w["serviceAccount"].as_str().unwrap().to_owned()))
        .collect();
    enrolled.sort();
    let want = [("client", "shopper"), ("web-1", "web"), ("web-2", "web")].map(|(a, b)| (a.to_owned(), b.to_owned()));
    assert_eq!(enrolled, want, "{s}");
    let pid_of_client = c.spawned_pid_of("client").unwrap();
    let client = s["workloads"].as_array().unwrap().iter().find(|w| w["name"] == "client").unwrap();
    assert_eq!(client["pid"].as_u64(), Some(u64::from(pid_of_client)), "the pod's process, found by its cgroup");

    // A meshed pod reaches the Service through the mesh.
    let (code, body) = c.curl("client", &format!("http://{VIP}/")).unwrap();
    assert_eq!(code, 0, "curl to the VIP failed; log:\n{}", d.log_text());
    assert!(body.contains("web-"), "{body}");
    let logged = d.log_with("\"target\":\"access\"", 1);
    assert!(logged.contains("shop/web"), "{logged}");
    let metrics = d.admin_get("/metrics").unwrap().1;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("mesh_connections_opened_total{") && l.contains("service=\"shop/web:80\"")),
        "{metrics}"
    );

    // The pod without a process is left out, and said so once, though
    // the state is written again below.
    let ghost = |log: &str| log.lines().filter(|l| l.contains("shop/ghost") && l.contains("no process")).count();
    assert_eq!(ghost(&d.log_with("shop/ghost", 1)), 1, "{}", d.log_text());

    // The control API only reads now.
    let out = c.meshctl("node-a", &["set-weight", "shop/web", &ip1, "9"]).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("managed by Kubernetes discovery"), "{err}");

    // web-2 terminates: drained (weight 0), not dropped.
    api.edit("discovery.k8s.io/v1", "EndpointSlice", "shop", "web-abcde", |o| {
        o["endpoints"][1] = endpoint(&c, "web-2", false, true);
    })
    .unwrap();
    eventually(&d, "web-2 drained", || web_endpoints(&d) == [(ip1.clone(), 3), (ip2.clone(), 0)]);

    // An outage: the state stays while the watches fail and back off...
    api.set_down(true);
    let log = d.log_with("watch failed", 4);
    assert_eq!(log.matches("watch failed").count(), 4, "one warning per kind:\n{log}");
    assert_eq!(web_endpoints(&d), [(ip1.clone(), 3), (ip2.clone(), 0)], "nothing dropped during the outage");
    // ...and what changed meanwhile arrives once the server is back.
    api.set_down(false);
    api.edit("v1", "Pod", "shop", "web-1", |o| o["metadata"]["annotations"]["mesh.io/weight"] = json!("5")).unwrap();
    eventually(&d, "web-1's new weight after the outage", || web_endpoints(&d) == [(ip1.clone(), 5), (ip2.clone(), 0)]);
    // Said when a failed watch delivers again: here the Pods' one.
    let log = d.log_with("watch resumed", 1);
    assert!(log.lines().any(|l| l.contains("watch resumed") && l.contains("\"kind\":\"Pod\"")), "{log}");

    assert_eq!(ghost(&d.log_text()), 1, "told once: {}", d.log_text());
    // This cluster has no Gateway API or Istio CRDs: routes and policies
    // are off, said once per kind (HTTPRoute, GRPCRoute,
    // AuthorizationPolicy; ReferenceGrant is not asked for without routes).
    let off = d.log_text().lines().filter(|l| l.contains("CRD of this kind is not installed")).count();
    assert_eq!(off, 3, "{}", d.log_text());

    // A restart while Pods cannot be listed: the saved state serves, not a
    // translation without pods (which would have no endpoints).
    // The log file is shared by both runs: count the new daemon's lines.
    let pods_failed =
        |log: &str| log.lines().filter(|l| l.contains("watch failed") && l.contains("\"kind\":\"Pod\"")).count();
    let before = pods_failed(&d.log_text());
    let mut d = d;
    d.stop().unwrap();
    api.set_down_only(&["/api/v1/pods"]);
    let d = c.start_daemon_with("node-a", None, &["--kubernetes", "--log-format", "json"], &env).unwrap();
    let log = d.log_with("watch failed", 5);
    assert_eq!(pods_failed(&log), before + 1, "the restarted daemon cannot list Pods:\n{log}");
    std::thread::sleep(2 * Duration::from_millis(200)); // past the debounce
    assert_eq!(web_endpoints(&d), [(ip1.clone(), 5), (ip2.clone(), 0)], "the saved state serves meanwhile");
    let (code, _) = c.curl("client", &format!("http://{VIP}/")).unwrap();
    assert_eq!(code, 0, "traffic still flows; log:\n{}", d.log_text());
    api.set_down(false);

    // The Service goes away: its VIP with it.
    api.delete("v1", "Service", "shop", "web").unwrap();
    eventually(&d, "the deleted service's VIP is gone", || state(&d)["services"].as_array().is_some_and(Vec::is_empty));
    assert!(api.requests().iter().any(|r| r.contains("watch=true")), "{:?}", api.requests());
}

#[test]
fn root_one_endpointslice_update_among_2000_services_is_translated_alone_and_reaches_the_kernel() {
    let _one = serial();
    const N: usize = 2000;
    let c = Cluster::create(&ClusterSpec::new().node("node-a").kube_pod("web-1", "node-a", WEB1_UID)).unwrap();
    c.serve("web-1", 8080, None).unwrap();
    let mut objects = vec![
        json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": "big" } }),
        pod(&c, "web-1", WEB1_UID, "web", None),
    ];
    // Kernel-mode Services with one endpoint each (addresses on the pod
    // network; only the kernel's slot tables see them).
    let backend = |i: usize, last: u8| format!("10.245.{}.{}", i / 250, last);
    for i in 0..N {
        let name = format!("s{i}");
        objects.push(json!({ "apiVersion": "v1", "kind": "Service",
            "metadata": { "name": name, "namespace": "big", "annotations": { "mesh.io/mode": "kernel" } },
            "spec": { "type": "ClusterIP", "clusterIP": format!("10.97.{}.{}", i / 250, i % 250 + 1),
                      "ports": [{ "name": "tcp", "port": 80, "protocol": "TCP", "targetPort": 8080 }] } }));
        objects.push(json!({ "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": { "name": format!("{name}-x1"), "namespace": "big",
                          "labels": { "kubernetes.io/service-name": name } },
            "addressType": "IPv4", "ports": [{ "name": "tcp", "port": 8080, "protocol": "TCP" }],
            "endpoints": [{ "addresses": [backend(i, 1)], "conditions": { "ready": true }, "nodeName": "node-a" }] }));
    }
    let api = FakeApiServer::start(&c.node("node-a").netns, "127.0.0.1".parse().unwrap(), objects).unwrap();
    let kubeconfig = api.kubeconfig(&c.dir).unwrap();
    let env = [("KUBECONFIG", kubeconfig.as_os_str()), ("RUST_LOG", OsStr::new("info"))];
    let d = c.start_daemon_with("node-a", None, &["--kubernetes", "--log-format", "json"], &env).unwrap();
    let services = || state(&d)["services"].as_array().map_or(0, Vec::len);
    assert!(wait_until(Duration::from_secs(60), || services() == N), "{} of {N}\n{}", services(), d.log_text());
    let first = d.log_with("state follows the cluster", 1);
    assert!(first.contains(&format!("\"services_translated\":{N}")), "{first}");

    // One slice of the middle Service changes its endpoint: one Service is
    // translated again, and its slot table in the kernel follows.
    let middle = N / 2;
    let vip = format!("10.97.{}.{}:80", middle / 250, middle % 250 + 1);
    api.edit("discovery.k8s.io/v1", "EndpointSlice", "big", &format!("s{middle}-x1"), |o| {
        o["endpoints"][0]["addresses"] = json!([backend(middle, 2)]);
    })
    .unwrap();
    let slots = || {
        let out = c.meshctl("node-a", &["datapath", "dump", "-o", "json"]).unwrap();
        let dump: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        dump["services"]
            .as_array()
            .and_then(|v| v.iter().find(|s| s["address"] == vip.as_str()).cloned())
            .map(|s| s["slots"].clone())
            .unwrap_or_default()
    };
    let want = json!([format!("{}:8080", backend(middle, 2))]);
    assert!(wait_until(Duration::from_secs(20), || slots() == want), "{}\n{}", slots(), d.log_text());
    let log = d.log_with("state follows the cluster", 2);
    let last = log.lines().rfind(|l| l.contains("state follows the cluster")).unwrap();
    assert!(last.contains("\"services_translated\":1,") || last.contains("\"services_translated\":1}"), "{last}");
}

/// An HTTPRoute as the API server returns it (with the fields the cluster
/// adds), parent shop/web:80.
fn http_route(name: &str, rules: Value) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": { "name": name, "namespace": "shop", "uid": format!("route-{name}"),
                      "creationTimestamp": "2026-12-01T10:00:00Z", "generation": 1,
                      "managedFields": [{ "manager": "kubectl", "operation": "Apply" }] },
        "spec": { "parentRefs": [{ "group": "", "kind": "Service", "name": "web", "port": 80 }], "rules": rules },
    })
}

#[test]
fn root_kubernetes_routes_from_the_api_server_take_effect_and_a_bad_one_is_left_out() {
    let _one = serial();
    let c = cluster();
    let mut objs = objects(&c);
    // shop/web-two: web-2 alone, behind its own VIP.
    objs.push(json!({ "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": "web-two", "namespace": "shop" },
        "spec": { "type": "ClusterIP", "clusterIP": "10.96.0.51", "clusterIPs": ["10.96.0.51"],
                  "ports": [{ "name": "http", "port": 80, "protocol": "TCP", "targetPort": "http" }] } }));
    objs.push(json!({ "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": { "name": "web-two-abcde", "namespace": "shop", "labels": { "kubernetes.io/service-name": "web-two" } },
        "addressType": "IPv4", "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
        "endpoints": [endpoint(&c, "web-2", true, false)] }));
    // other/far: web-2 too, in a namespace the routes of shop may name
    // only with a ReferenceGrant there.
    objs.push(json!({ "apiVersion": "v1", "kind": "Namespace",
        "metadata": { "name": "other", "labels": { "mesh.io/inject": "enabled" } } }));
    objs.push(json!({ "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": "far", "namespace": "other" },
        "spec": { "type": "ClusterIP", "clusterIP": "10.96.0.52", "clusterIPs": ["10.96.0.52"],
                  "ports": [{ "name": "http", "port": 80, "protocol": "TCP", "targetPort": "http" }] } }));
    objs.push(json!({ "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": { "name": "far-abcde", "namespace": "other", "labels": { "kubernetes.io/service-name": "far" } },
        "addressType": "IPv4", "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
        "endpoints": [endpoint(&c, "web-2", true, false)] }));
    let path = |p: &str| json!([{ "path": { "type": "PathPrefix", "value": p } }]);
    objs.push(http_route(
        "split",
        json!([{ "matches": path("/two"), "backendRefs": [{ "name": "web-two", "port": 80 }] },
               { "matches": path("/three"), "backendRefs": [{ "name": "nope", "port": 80 }] },
               { "matches": path("/far"), "backendRefs": [{ "name": "far", "namespace": "other", "port": 80 }] },
               { "backendRefs": [{ "name": "web", "port": 80 }] }]),
    ));
    let regex = json!([{ "type": "RegularExpression", "value": "([" }]);
    objs.push(http_route(
        "broken",
        json!([{ "matches": [{ "path": regex[0] }], "backendRefs": [{ "name": "web", "port": 80 }] }]),
    ));

    let api = FakeApiServer::start(&c.node("node-a").netns, "127.0.0.1".parse().unwrap(), objs).unwrap();
    api.install_gateway_api();
    let kubeconfig = api.kubeconfig(&c.dir).unwrap();
    let env = [("KUBECONFIG", kubeconfig.as_os_str()), ("RUST_LOG", OsStr::new("info"))];
    let d = c.start_daemon_with("node-a", None, &["--kubernetes", "--log-format", "json"], &env).unwrap();

    let routes = |d: &Daemon| -> Vec<String> {
        state(d)["routes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["metadata"]["name"].as_str().map(str::to_owned))
            .collect()
    };
    eventually(&d, "the valid route is in the state", || routes(&d) == ["split"]);
    let log = d.log_with("route not accepted", 1);
    let line = log.lines().find(|l| l.contains("route not accepted")).unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("HTTPRoute shop/broken") && line.contains("is not a regular expression"), "{line}");
    for _ in 0..5 {
        let (code, body) = c.curl("client", &format!("http://{VIP}/two/x")).unwrap();
        assert_eq!(code, 0, "{}", d.log_text());
        assert!(body.contains("web-2"), "/two goes to web-two: {body}");
    }
    // A backend that does not resolve keeps its route, and its share is
    // answered 500 (the Gateway API's rule): no such Service, and a
    // Service of another namespace without a ReferenceGrant.
    let status = |p: &str| {
        let out = c
            .exec(
                "client",
                "curl",
                &["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", &format!("http://{VIP}{p}")],
                Duration::from_secs(10),
            )
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(status("/three/x"), "500");
    assert_eq!(status("/far/x"), "500");
    let log = d.log_with("RefNotPermitted", 1);
    assert!(log.contains("no ReferenceGrant there lets HTTPRoutes of shop name it"), "{log}");
    // The grant arrives: /far reaches other/far's endpoint.
    api.put(json!({ "apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
        "metadata": { "name": "shop-routes", "namespace": "other" },
        "spec": { "from": [{ "group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": "shop" }],
                  "to": [{ "group": "", "kind": "Service", "name": "far" }] } }))
        .unwrap();
    eventually(&d, "the grant is in the state", || {
        state(&d)["referenceGrants"].as_array().is_some_and(|g| g.len() == 1)
    });
    for _ in 0..5 {
        let (code, body) = c.curl("client", &format!("http://{VIP}/far/x")).unwrap();
        assert_eq!(code, 0, "{}", d.log_text());
        assert!(body.contains("web-2"), "/far goes to other/far: {body}");
    }
    assert_eq!(status("/three/x"), "500", "still no shop/nope");

    // The route changes in the cluster: /two now goes to web as well.
    api.edit("gateway.networking.k8s.io/v1", "HTTPRoute", "shop", "split", |o| {
        o["spec"]["rules"][0]["backendRefs"][0]["name"] = json!("web");
    })
    .unwrap();
    let web_only = |d: &Daemon| state(d)["routes"][0]["spec"]["rules"][0]["backendRefs"][0]["name"] == "web";
    eventually(&d, "the edited route", || web_only(&d));
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let (_, body) = c.curl("client", &format!("http://{VIP}/two/x")).unwrap();
        seen.extend(["web-1", "web-2"].into_iter().filter(|w| body.contains(*w)));
    }
    assert_eq!(seen.len(), 2, "/two spread over web's endpoints (weights 3:1): {seen:?}");
}

fn authorization_policy(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": { "name": name, "namespace": "shop", "uid": format!("policy-{name}"), "generation": 1 },
        "spec": spec,
    })
}

#[test]
fn root_kubernetes_authorization_policies_apply_and_a_broken_allow_fails_closed() {
    let _one = serial();
    let c = cluster();
    let mut objs = objects(&c);
    // An ALLOW policy for web whose principal the model refuses (written
    // with spiffe://): it must deny, not open everything.
    let spec = |principal: &str| {
        json!({ "targetRefs": [{ "group": "", "kind": "Service", "name": "web" }],
                "rules": [{ "from": [{ "source": { "principals": [principal] } }] }] })
    };
    objs.push(authorization_policy("web-callers", spec("spiffe://cluster.local/ns/shop/sa/shopper")));
    let api = FakeApiServer::start(&c.node("node-a").netns, "127.0.0.1".parse().unwrap(), objs).unwrap();
    api.install_istio();
    let kubeconfig = api.kubeconfig(&c.dir).unwrap();
    let env = [("KUBECONFIG", kubeconfig.as_os_str()), ("RUST_LOG", OsStr::new("info"))];
    let d = c.start_daemon_with("node-a", None, &["--kubernetes", "--log-format", "json"], &env).unwrap();

    eventually(&d, "the stand-in policy is in the state", || {
        state(&d)["policies"].as_array().is_some_and(|p| p.len() == 1)
    });
    let log = d.log_with("it fails closed", 1);
    let line = log.lines().find(|l| l.contains("AuthorizationPolicy not accepted")).unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("shop/web-callers") && line.contains("write principals without spiffe://"), "{line}");
    for _ in 0..5 {
        let (code, body) = c.curl("client", &format!("http://{VIP}/")).unwrap();
        assert_eq!((code, body.trim()), (0, "RBAC: access denied"), "a broken ALLOW denies\n{}", d.log_text());
    }

    // The policy mended in the cluster: the client's service account may call.
    api.edit("security.istio.io/v1", "AuthorizationPolicy", "shop", "web-callers", |o| {
        o["spec"]["rules"][0]["from"][0]["source"]["principals"][0] = json!("cluster.local/ns/shop/sa/shopper");
    })
    .unwrap();
    let allowed =
        || c.curl("client", &format!("http://{VIP}/")).is_ok_and(|(code, body)| code == 0 && body.contains("web-"));
    eventually(&d, "the mended policy allows the client", allowed);
    // Another principal only: denied again.
    api.edit("security.istio.io/v1", "AuthorizationPolicy", "shop", "web-callers", |o| {
        o["spec"]["rules"][0]["from"][0]["source"]["principals"][0] = json!("cluster.local/ns/shop/sa/someone-else");
    })
    .unwrap();
    let denied =
        || c.curl("client", &format!("http://{VIP}/")).is_ok_and(|(_, body)| body.trim() == "RBAC: access denied");
    eventually(&d, "a policy for another principal denies the client", denied);
}

/// A dual-stack cluster as the API server describes it: a Service with
/// an IPv4 and an IPv6 `clusterIP` and a slice per family, an IPv6-only
/// Service, pods with `podIPs` and `hostIPs` of both families. The daemon
/// takes them as they are, and a pod reaches each VIP.
#[test]
fn root_kubernetes_dual_stack_services_slices_and_pods_take_effect() {
    let _one = serial();
    let c = cluster_of(mesh_tests::Stack::Dual);
    let node = c.node("node-a").clone();
    let dual_pod = |name: &str, uid: &str, sa: &str| {
        let mut o = pod(&c, name, uid, sa, None);
        let p = c.pod(name);
        o["status"]["podIPs"] = json!([{ "ip": p.ip.to_string() }, { "ip": p.ip6.unwrap().to_string() }]);
        o["status"]["hostIPs"] =
            json!([{ "ip": node.address.to_string() }, { "ip": node.address6.unwrap().to_string() }]);
        o
    };
    let v6_endpoint = |name: &str| {
        let mut e = endpoint(&c, name, true, false);
        e["addresses"] = json!([c.pod(name).ip6.unwrap().to_string()]);
        e
    };
    let slice = |name: &str, service: &str, family: &str, endpoints: Vec<Value>| {
        json!({ "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": { "name": name, "namespace": "shop", "labels": { "kubernetes.io/service-name": service } },
                "addressType": family, "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
                "endpoints": endpoints })
    };
    let service = |name: &str, ips: &[&str], families: &[&str]| {
        json!({ "apiVersion": "v1", "kind": "Service", "metadata": { "name": name, "namespace": "shop" },
                "spec": { "type": "ClusterIP", "clusterIP": ips[0], "clusterIPs": ips, "ipFamilies": families,
                          "ipFamilyPolicy": if ips.len() == 2 { "RequireDualStack" } else { "SingleStack" },
                          "ports": [{ "name": "http", "port": 80, "protocol": "TCP", "targetPort": "http" }] } })
    };
    let objects = vec![
        json!({ "apiVersion": "v1", "kind": "Namespace",
                "metadata": { "name": "shop", "labels": { "mesh.io/inject": "enabled" } } }),
        service("web", &[VIP, "fd00:96::50"], &["IPv4", "IPv6"]),
        slice("web-v4", "web", "IPv4", vec![endpoint(&c, "web-1", true, false)]),
        slice("web-v6", "web", "IPv6", vec![v6_endpoint("web-2")]),
        service("six", &["fd00:96::51"], &["IPv6"]),
        slice("six-v6", "six", "IPv6", vec![v6_endpoint("web-1"), v6_endpoint("web-2")]),
        dual_pod("client", CLIENT_UID, "shopper"),
        dual_pod("web-1", WEB1_UID, "web"),
        dual_pod("web-2", WEB2_UID, "web"),
    ];
    let api = FakeApiServer::start(&node.netns, "127.0.0.1".parse().unwrap(), objects).unwrap();
    let kubeconfig = api.kubeconfig(&c.dir).unwrap();
    let env = [("KUBECONFIG", kubeconfig.as_os_str()), ("RUST_LOG", OsStr::new("info"))];
    let d = c.start_daemon_with("node-a", None, &["--kubernetes"], &env).unwrap();

    let (w1_6, w2_6) = (c.pod("web-1").ip6.unwrap().to_string(), c.pod("web-2").ip6.unwrap().to_string());
    eventually(&d, "shop/web with an endpoint of each family", || {
        web_endpoints(&d) == [(c.pod("web-1").ip.to_string(), 1), (w2_6.clone(), 1)]
    });
    let s = state(&d);
    let web = s["services"].as_array().unwrap().iter().find(|s| s["name"] == "web").unwrap();
    assert_eq!(web["vips"], json!([VIP, "fd00:96::50"]), "{s}");
    let six = s["services"].as_array().unwrap().iter().find(|s| s["name"] == "six").unwrap();
    assert_eq!(six["vip"], "fd00:96::51", "{s}");
    let client = s["workloads"].as_array().unwrap().iter().find(|w| w["name"] == "client").unwrap();
    assert_eq!(client["ips"].as_array().map(Vec::len), Some(2), "{s}");
    assert_eq!(s["nodes"][0]["addresses"].as_array().map(Vec::len), Some(2), "{s}");

    // Each VIP answers from its family's endpoints.
    for (url, want) in
        [(format!("http://{VIP}/"), "backend=web-1"), ("http://[fd00:96::50]/".to_owned(), "backend=web-2")]
    {
        let (code, body) = c.curl("client", &url).unwrap();
        assert_eq!(code, 0, "{url}: {body}\n{}", d.log_text());
        assert!(body.contains(want), "{url}: {body}");
    }
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let (code, body) = c.curl("client", "http://[fd00:96::51]/").unwrap();
        assert_eq!(code, 0, "{body}");
        seen.insert(body.split_whitespace().next().unwrap_or_default().to_owned());
    }
    assert_eq!(seen.len(), 2, "the IPv6-only Service balances over both: {seen:?} ({w1_6}, {w2_6})");
}
