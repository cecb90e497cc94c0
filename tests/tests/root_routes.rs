//! End-to-end tests of traffic routing (Gateway API HTTPRoute on the mesh,
//! GAMMA) on the mini cluster (root, real kernel): the cases of the Gateway
//! API's mesh conformance suite (`conformance/tests/mesh/` in
//! kubernetes-sigs/gateway-api), their routes applied with `meshctl apply`
//! as the suite writes them, and real clients (curl, and one held HTTP/2
//! connection) in a meshed pod.

use std::collections::BTreeMap;
use std::time::Duration;

use mesh_tests::follow::Follower;
use mesh_tests::loadgen::assert_share;
use mesh_tests::{Cluster, ClusterSpec, Daemon};

const VIP: &str = "10.96.0.10";

use mesh_tests::one_at_a_time as serial;

struct Mesh {
    d: Daemon,
    c: Cluster,
}

/// Pods echo, echo-v1, echo-v2 (mt-http named after its pod on 8080) and
/// the client; Services echo (VIP:80, `auto`), echo-v1 and echo-v2
/// (ports 80 and 8080), each with its pod, as the conformance suite's.
fn mesh() -> Mesh {
    let c = Cluster::create(
        &ClusterSpec::new()
            .node("node-a")
            .pod("client", "node-a")
            .pod("echo", "node-a")
            .pod("echo-v1", "node-a")
            .pod("echo-v2", "node-a")
            .pod("bad", "node-a"),
    )
    .expect("mini cluster");
    for p in ["echo", "echo-v1", "echo-v2"] {
        c.serve_http(p, 8080, &[]).unwrap();
    }
    // In no service until a test puts it behind echo-v1.
    c.serve_http("bad", 8080, &["--status", "503"]).unwrap();
    let cfg = c.write_file("mesh.yaml", &document(&c, &[])).unwrap();
    let d = c.start_daemon("node-a", &cfg, &[]).unwrap();
    Mesh { d, c }
}

/// The state: the Services and `routes`, each a Gateway API object in
/// block YAML as a user writes it.
fn document(c: &Cluster, routes: &[&str]) -> String {
    let svc = |name: &str, vip: &str, ports: &str| {
        format!(
            "  - name: {name}\n    vip: {vip}\n    ports: [{ports}]\n    healthCheck: {{ protocol: none }}\n    \
             endpoints: [{{ ip: {}, node: node-a }}]\n",
            c.pod(name).ip
        )
    };
    let two = "{ port: 80, targetPort: 8080, appProtocol: auto }, { port: 8080, appProtocol: auto }";
    let mut doc = c.config(&format!(
        "{}{}{}",
        svc("echo", VIP, "{ port: 80, targetPort: 8080, appProtocol: auto }"),
        svc("echo-v1", "10.96.0.11", two),
        svc("echo-v2", "10.96.0.12", two)
    ));
    doc.push_str(&routes_list(routes));
    doc
}

/// `routes:` with each object (block YAML, as the suite writes it) as one
/// item; nothing for none.
fn routes_list(routes: &[&str]) -> String {
    let mut out = String::new();
    if !routes.is_empty() {
        out.push_str("routes:\n");
    }
    for r in routes {
        for (i, line) in r.trim().lines().enumerate() {
            out.push_str(if i == 0 { "  - " } else { "    " });
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn apply(m: &Mesh, routes: &[&str]) {
    let f = m.c.write_file("routes.yaml", &document(&m.c, routes)).unwrap();
    let out = m.c.meshctl("node-a", &["apply", "-f", f.to_str().unwrap()]).unwrap();
    assert!(out.status.success(), "meshctl apply: {}", String::from_utf8_lossy(&out.stderr));
}

/// curl from the client pod: the status, the `Location`, the response
/// headers (lowercase names) and the body's `key=value` lines.
struct Got {
    status: u16,
    headers: BTreeMap<String, String>,
    body: BTreeMap<String, String>,
}

fn get(m: &Mesh, path: &str, headers: &[(&str, &str)]) -> Got {
    get_at(m, VIP, path, headers)
}

/// As [`get`], to `host` (an address, with a port or not).
fn get_at(m: &Mesh, host: &str, path: &str, headers: &[(&str, &str)]) -> Got {
    let url = format!("http://{host}{path}");
    let mut args = vec!["-sS", "--max-time", "5", "-D", "-", "-H", "x-echo-request: 1"];
    let hs: Vec<String> = headers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    for h in &hs {
        args.extend(["-H", h.as_str()]);
    }
    args.push(&url);
    let out = m.c.exec("client", "curl", &args, Duration::from_secs(10)).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    assert!(out.status.success(), "curl {path}: {}", String::from_utf8_lossy(&out.stderr));
    let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok()).unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let body = body.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
    Got { status, headers, body }
}

/// `meshctl route check default/echo URL` for the same request: the
/// decision of the proxy's own code on the daemon's state.
fn check(m: &Mesh, path: &str, headers: &[(&str, &str)]) -> serde_json::Value {
    let url = format!("http://{VIP}{path}");
    let mut args = vec!["route", "check", "default/echo", url.as_str(), "-o", "json"];
    let hs: Vec<String> = headers.iter().map(|(k, v)| format!("{k}={v}")).collect();
    for h in &hs {
        args.extend(["--header", h.as_str()]);
    }
    let out = m.c.meshctl("node-a", &args).unwrap();
    assert!(out.status.success(), "meshctl route check {path}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Whether `meshctl route check` says what the live request got.
fn agrees(m: &Mesh, path: &str, headers: &[(&str, &str)], got: &Got) {
    let c = check(m, path, headers);
    let said = match c["decision"].as_str() {
        Some("forward") => {
            let b = c["backends"].as_array().unwrap();
            assert_eq!(b.len(), 1, "one backend per rule here: {c}");
            let backend = b[0]["backend"].as_str().unwrap();
            format!("200 {}", backend.trim_start_matches("default/").split(':').next().unwrap())
        }
        Some("service") => "200 echo".to_owned(),
        Some("404") => "404 ".to_owned(),
        Some("redirect") => format!("{} {}", c["status"], c["location"].as_str().unwrap()),
        other => panic!("{other:?}: {c}"),
    };
    let live = match got.status {
        200 => format!("200 {}", got.backend()),
        s if (300..400).contains(&s) => format!("{s} {}", got.headers.get("location").map_or("", String::as_str)),
        s => format!("{s} "),
    };
    assert_eq!(said, live, "meshctl route check {path} {headers:?} disagrees with the live request: {c}");
}

impl Got {
    fn backend(&self) -> &str {
        self.body.get("backend").map_or("", String::as_str)
    }
}

const MATCHING: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: mesh-matching
  namespace: default
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: echo
    port: 80
  rules:
  - matches:
    - path:
        type: PathPrefix
        value: /
    - headers:
      - name: version
        value: one
    backendRefs:
    - name: echo-v1
      port: 8080
  - matches:
    - path:
        type: PathPrefix
        value: /v2
    - headers:
      - name: version
        value: two
    backendRefs:
    - name: echo-v2
      port: 8080
"#;

const SPLIT: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: mesh-split
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: echo
  rules:
  - matches:
    - path:
        type: Exact
        value: /v1
    backendRefs:
    - name: echo-v1
      port: 80
  - matches:
    - path:
        type: Exact
        value: /v2
    backendRefs:
    - name: echo-v2
      port: 80
"#;

const FILTERS: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: mesh-filters
spec:
  parentRefs:
  - name: echo
    port: 80
  rules:
  - matches:
    - path:
        type: PathPrefix
        value: /set
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set:
        - name: X-Header-Set
          value: set-overwrites-values
        add:
        - name: X-Header-Add
          value: add-appends-values
        remove:
        - X-Header-Remove
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        add:
        - name: X-Header-Add-Response
          value: added
    backendRefs:
    - name: echo-v1
      port: 8080
  - matches:
    - path:
        type: PathPrefix
        value: /prefix/one
    filters:
    - type: URLRewrite
      urlRewrite:
        path:
          type: ReplacePrefixMatch
          replacePrefixMatch: /one
    backendRefs:
    - name: echo-v1
      port: 80
  - matches:
    - path:
        type: PathPrefix
        value: /original-prefix
    filters:
    - type: RequestRedirect
      requestRedirect:
        path:
          type: ReplacePrefixMatch
          replacePrefixMatch: /replacement-prefix
  - matches:
    - path:
        type: PathPrefix
        value: /scheme-and-host
    filters:
    - type: RequestRedirect
      requestRedirect:
        hostname: example.org
        scheme: https
        statusCode: 301
  - matches:
    - path:
        type: PathPrefix
        value: /port
    filters:
    - type: RequestRedirect
      requestRedirect:
        port: 8083
        statusCode: 307
"#;

fn weights(v1: u32, v2: u32) -> String {
    format!(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: mesh-weighted-backends
spec:
  parentRefs:
  - name: echo
    port: 80
  rules:
  - backendRefs:
    - name: echo-v1
      port: 8080
      weight: {v1}
    - name: echo-v2
      port: 8080
      weight: {v2}
    - name: echo
      port: 80
      weight: 0
"#
    )
}

#[test]
fn root_httproute_matching_split_and_filters_as_the_conformance_suite() {
    let _one = serial();
    let m = mesh();
    let g = get(&m, "/v2", &[]);
    assert_eq!(g.backend(), "echo", "no route: the Service balances itself");
    agrees(&m, "/v2", &[], &g);

    apply(&m, &[MATCHING]);
    for (path, headers, want) in [
        ("/", &[][..], "echo-v1"),
        ("/example", &[], "echo-v1"),
        ("/", &[("Version", "one")], "echo-v1"),
        ("/v2", &[], "echo-v2"),
        ("/v2/example", &[], "echo-v2"),
        ("/", &[("Version", "two")], "echo-v2"),
        ("/v2/", &[], "echo-v2"),
        ("/v2example", &[], "echo-v1"),
        ("/foo/v2/example", &[], "echo-v1"),
    ] {
        let g = get(&m, path, headers);
        assert_eq!((g.status, g.backend()), (200, want), "mesh-matching {path} {headers:?}");
        agrees(&m, path, headers, &g);
    }
    let out = m.c.meshctl("node-a", &["get", "routes", "-o", "json"]).unwrap();
    let routes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(routes[0]["name"], "default/mesh-matching", "{routes}");
    assert_eq!(routes[0]["parents"], serde_json::json!(["default/echo:80"]), "{routes}");
    assert_eq!(routes[0]["rules"][1]["backends"], serde_json::json!(["echo-v2:8080 w1"]), "{routes}");
    assert_eq!(routes[0]["status"], "Accepted, ResolvedRefs");
    let text = |args: &[&str]| String::from_utf8_lossy(&m.c.meshctl("node-a", args).unwrap().stdout).into_owned();
    let t = text(&["get", "routes"]);
    assert!(t.contains("default/mesh-matching") && t.contains("default/echo:80"), "{t}");
    let t = text(&["route", "check", "echo", &format!("http://{VIP}/v2/x")]);
    assert!(t.contains("decision: forward") && t.contains("backend: default/echo-v2:8080 weight 1 (100%)"), "{t}");
    assert!(t.contains("why: route default/mesh-matching spec.rules[1].matches[0] (path PathPrefix /v2)"), "{t}");
    // Each request is counted by its route, rule and backend Service.
    let rule = |r: &str, rule: &str, backend: &str, class: &str| {
        let labels = [
            format!("route=\"{r}\""),
            format!("rule=\"{rule}\""),
            format!("backend=\"{backend}\""),
            format!("class=\"{class}\""),
        ];
        m.d.metric("mesh_route_requests_total", &labels.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let counted = || {
        (
            rule("default/mesh-matching", "0", "default/echo-v1:8080", "2xx"),
            rule("default/mesh-matching", "1", "default/echo-v2:8080", "2xx"),
        )
    };
    assert!(mesh_tests::sys::wait_until(Duration::from_secs(5), || counted() == (5, 4)), "{:?}", counted());

    apply(&m, &[SPLIT]);
    assert!(
        mesh_tests::sys::wait_until(Duration::from_secs(5), || counted() == (0, 0)),
        "the series of a route that left the state go with it: {:?}",
        counted()
    );
    assert_eq!(get(&m, "/v1", &[]).backend(), "echo-v1", "mesh-split");
    assert_eq!(get(&m, "/v2", &[]).backend(), "echo-v2", "mesh-split");
    let g = get(&m, "/other", &[]);
    assert_eq!((g.status, g.headers.get("mesh-error").map(String::as_str)), (404, Some("no_route")));
    agrees(&m, "/other", &[], &g);
    agrees(&m, "/v1", &[], &get(&m, "/v1", &[]));

    apply(&m, &[FILTERS]);
    let g = get(
        &m,
        "/set",
        &[("X-Header-Set", "some-other-value"), ("X-Header-Remove", "gone"), ("X-Header-Add", "there")],
    );
    assert_eq!(g.backend(), "echo-v1");
    assert_eq!(g.body.get("x-header-set").map(String::as_str), Some("set-overwrites-values"), "{:?}", g.body);
    assert!(!g.body.contains_key("x-header-remove"), "{:?}", g.body);
    assert_eq!(g.headers.get("x-header-add-response").map(String::as_str), Some("added"), "{:?}", g.headers);
    let g = get(&m, "/prefix/one/two", &[]);
    assert_eq!((g.backend(), g.body.get("path").map(String::as_str)), ("echo-v1", Some("/one/two")), "rewrite-path");
    for (path, status, location) in [
        ("/original-prefix/lemon", 302, format!("http://{VIP}/replacement-prefix/lemon")),
        ("/scheme-and-host", 301, "https://example.org/scheme-and-host".to_owned()),
        ("/port", 307, format!("http://{VIP}:8083/port")),
    ] {
        let g = get(&m, path, &[]);
        assert_eq!((g.status, g.headers.get("location")), (status, Some(&location)), "redirect {path}");
        agrees(&m, path, &[], &g);
        assert_eq!(g.backend(), "", "a redirect reaches no backend");
    }
    // Each request's access-log line names the route and rule that decided it.
    let log = m.d.log_with("route=default/mesh-filters rule=2", 1);
    let line = log.lines().find(|l| l.contains("path=/original-prefix/lemon")).unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("route=default/mesh-filters rule=2") && line.contains("outcome=redirect"), "{line}");
    // A redirect is counted on its rule with no backend.
    assert_eq!(rule("default/mesh-filters", "2", "", "3xx"), 1, "/original-prefix/lemon");
    let line = log.lines().find(|l| l.contains("path=/v2example")).unwrap_or_else(|| panic!("{log}"));
    assert!(
        line.contains("service=default/echo-v1:8080") && line.contains("route=default/mesh-matching rule=0"),
        "{line}"
    );

    // A backendRef to no Service: the route applies, meshctl apply warns,
    // `get routes` says ResolvedRefs=False, and its share is answered 500.
    let f = m.c.write_file("routes.yaml", &document(&m.c, &[HALF])).unwrap();
    let out = m.c.meshctl("node-a", &["apply", "-f", f.to_str().unwrap()]).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(
            "warning: routes[0].spec.rules[0].backendRefs[1]: there is no service default/echo-v3 (BackendNotFound)"
        ),
        "{err}"
    );
    let out = m.c.meshctl("node-a", &["get", "routes", "-o", "json"]).unwrap();
    let routes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        routes[0]["status"]
            .as_str()
            .unwrap_or("")
            .starts_with("Accepted, ResolvedRefs=False: routes[0].spec.rules[0].backendRefs[1]"),
        "{routes}"
    );
    let mut seen = BTreeMap::<(u16, String), u32>::new();
    for _ in 0..40 {
        let g = get(&m, "/", &[]);
        *seen.entry((g.status, g.backend().to_owned())).or_default() += 1;
    }
    let (ok, bad) = (
        seen.get(&(200, "echo-v1".into())).copied().unwrap_or(0),
        seen.get(&(500, String::new())).copied().unwrap_or(0),
    );
    assert_eq!(ok + bad, 40, "only echo-v1 or 500: {seen:?}");
    // Half each: 40 draws at p = 0.5 fall outside 8..=32 with odds under 1e-4.
    assert!((8..=32).contains(&ok), "{seen:?}");
    let c = check(&m, "/", &[]);
    assert_eq!(c["backends"][1]["share"], 0.5, "{c}");
}

/// One backendRef resolves, one names no Service: half the requests 500.
const HALF: &str = "
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: half}
spec:
  parentRefs: [{group: '', kind: Service, name: echo, port: 80}]
  rules:
  - backendRefs: [{name: echo-v1, port: 8080}, {name: echo-v3, port: 8080}]
";

/// One HTTP/2 connection held across every kind of write to a routed
/// Service: route weights, a route added and removed, and behind the route
/// the backend Service's new endpoint, a drain (`set-weight 0`) and the
/// rule's `timeouts.request` set and lifted. Each batch is sent as soon as
/// `meshctl` returns.
#[test]
fn root_one_held_http2_connection_follows_route_writes() {
    let _one = serial();
    let m = mesh();
    let mut f = Follower::open(&m.c, "client", &format!("{VIP}:80"), true).unwrap();
    let t = f.batch(50, "/").unwrap();
    assert_eq!(t, BTreeMap::from([("echo".into(), 50)]), "no route yet");

    // httproute-weight: 70/30/0, judged by binomial bounds.
    apply(&m, &[&weights(70, 30)]);
    let t = f.batch(400, "/").unwrap();
    assert_eq!(t.get("echo-v1").unwrap_or(&0) + t.get("echo-v2").unwrap_or(&0), 400, "weight 0 gets nothing: {t:?}");
    assert_share(*t.get("echo-v1").unwrap_or(&0), 400, 0.7, "route 70/30/0: echo-v1", &t);

    apply(&m, &[&weights(80, 20)]);
    let t = f.batch(400, "/").unwrap();
    assert_eq!(t.get("echo-v1").unwrap_or(&0) + t.get("echo-v2").unwrap_or(&0), 400, "weight 0 gets nothing: {t:?}");
    assert_share(*t.get("echo-v1").unwrap_or(&0), 400, 0.8, "route 80/20: echo-v1", &t);

    apply(&m, &[&weights(20, 80)]);
    let t = f.batch(400, "/").unwrap();
    assert_share(*t.get("echo-v1").unwrap_or(&0), 400, 0.2, "route 20/80 on the same connection: echo-v1", &t);

    apply(&m, &[SPLIT]);
    let t = f.batch(20, "/v2").unwrap();
    assert_eq!(t, BTreeMap::from([("echo-v2".into(), 20)]), "a new route");
    let t = f.batch(5, "/").unwrap();
    assert_eq!(t, BTreeMap::from([("404".into(), 5)]), "and its 404");

    // Behind the route, the backend Service's own writes: echo-v1 gains
    // a second endpoint (echo-v2's pod, so its answers say which), loses
    // its first to a drain, and the rule gains and loses a request timeout.
    let (v1, v2) = (m.c.pod("echo-v1").ip, m.c.pod("echo-v2").ip);
    let held = |timeouts: &str, endpoints: &str| {
        let route = format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: held\nspec:\n  \
             parentRefs: [{{ name: echo, port: 80 }}]\n  rules:\n  - backendRefs: [{{ name: echo-v1, port: 8080 }}]\n{timeouts}"
        );
        let doc = document(&m.c, &[&route])
            .replace(&format!("endpoints: [{{ ip: {v1}, node: node-a }}]"), &format!("endpoints: [{endpoints}]"));
        let file = m.c.write_file("held.yaml", &doc).unwrap();
        let out = m.c.meshctl("node-a", &["apply", "-f", file.to_str().unwrap()]).unwrap();
        assert!(out.status.success(), "meshctl apply: {}", String::from_utf8_lossy(&out.stderr));
    };
    held("", &format!("{{ ip: {v1}, node: node-a }}"));
    let t = f.batch(20, "/").unwrap();
    assert_eq!(t, BTreeMap::from([("echo-v1".into(), 20)]), "the route to echo-v1, one endpoint");
    held("", &format!("{{ ip: {v1}, node: node-a }}, {{ ip: {v2}, node: node-a }}"));
    let t = f.batch(400, "/").unwrap();
    assert_eq!(t.get("echo-v1").unwrap_or(&0) + t.get("echo-v2").unwrap_or(&0), 400, "{t:?}");
    assert_share(*t.get("echo-v2").unwrap_or(&0), 400, 0.5, "a new endpoint of the backend Service", &t);
    let out = m.c.meshctl("node-a", &["set-weight", "echo-v1", &v1.to_string(), "0"]).unwrap();
    assert!(out.status.success(), "meshctl set-weight: {}", String::from_utf8_lossy(&out.stderr));
    let t = f.batch(100, "/").unwrap();
    assert_eq!(t, BTreeMap::from([("echo-v2".into(), 100)]), "echo-v1's endpoint drained: none of the next requests");
    let drained = format!("{{ ip: {v1}, node: node-a, weight: 0 }}, {{ ip: {v2}, node: node-a }}");
    let t = f.batch(4, "/delay/400").unwrap();
    assert_eq!(t, BTreeMap::from([("echo-v2".into(), 4)]), "no timeout yet");
    held("    timeouts: { request: 100ms }\n", &drained);
    let t = f.batch(4, "/delay/400").unwrap();
    assert_eq!(t, BTreeMap::from([("504".into(), 4)]), "the rule's new request timeout holds for the next requests");
    let t = f.batch(10, "/").unwrap();
    assert_eq!(t, BTreeMap::from([("echo-v2".into(), 10)]), "quick requests are answered");
    held("", &drained);
    let t = f.batch(4, "/delay/400").unwrap();
    assert_eq!(t, BTreeMap::from([("echo-v2".into(), 4)]), "the timeout lifted");

    apply(&m, &[]);
    let t = f.batch(20, "/v2").unwrap();
    assert_eq!(t, BTreeMap::from([("echo".into(), 20)]), "the route removed: the Service as it was");
    assert_eq!(m.d.counter("proxy", "accepted").unwrap(), 1, "every batch went over one client connection");
}

/// GRPCRoute on the mesh: echo (node-a), echo-v1 (node-a) and echo-v2
/// (node-b, through the tunnel) serve `mesh.test.Echo` (mt-grpc) on 50051
/// behind Services of port 7070; a daemon on each node.
#[test]
fn root_grpcroute_weights_and_header_modifier_across_nodes() {
    let _one = serial();
    let c = Cluster::create(
        &ClusterSpec::new()
            .node("node-a")
            .node("node-b")
            .pod("client", "node-a")
            .pod("echo", "node-a")
            .pod("echo-v1", "node-a")
            .pod("echo-v2", "node-b"),
    )
    .expect("mini cluster");
    for g in ["echo", "echo-v1", "echo-v2"] {
        c.spawn(g, &c.bins.mt_grpc.clone(), &["serve", "--name", g, "--port", "50051"]).unwrap();
        let p = c.pod(g).clone();
        let up = || mesh_tests::sys::can_connect(&p.netns, p.addr(50051));
        assert!(mesh_tests::sys::wait_until(Duration::from_secs(10), up), "{g} serves");
    }
    let svc = |name: &str, vip: &str, node: &str| {
        format!(
            "  - name: {name}\n    vip: {vip}\n    ports: [{{ port: 7070, targetPort: 50051, appProtocol: grpc }}]\n    \
             healthCheck: {{ protocol: none }}\n    endpoints: [{{ ip: {}, node: {node} }}]\n",
            c.pod(name).ip
        )
    };
    let services = format!(
        "{}{}{}",
        svc("echo", VIP, "node-a"),
        svc("echo-v1", "10.96.0.11", "node-a"),
        svc("echo-v2", "10.96.0.12", "node-b")
    );
    let with_routes =
        |routes: &str| c.write_file("mesh.yaml", &(c.config(&services) + &routes_list(&[routes]))).unwrap();
    let weights = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata:
  name: mesh-grpc-weighted-backends
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: echo
    port: 7070
  rules:
  - backendRefs:
    - name: echo-v1
      port: 7070
      weight: 70
    - name: echo-v2
      port: 7070
      weight: 30
    - name: echo
      port: 7070
      weight: 0
"#;
    let cfg = with_routes(weights);
    let a = c.start_daemon("node-a", &cfg, &[]).unwrap();
    let b = c.start_daemon("node-b", &cfg, &[]).unwrap();
    let call = |n: &str, extra: &[&str]| {
        let url = format!("http://{VIP}:7070");
        let mut args = vec!["call", url.as_str(), n];
        args.extend(extra);
        let out = c.exec("client", "mt-grpc", &args, Duration::from_secs(60)).unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success() && text.contains("failed=0"), "{text}\n{}\n{}", a.log_text(), b.log_text());
        text
    };
    let text = call("300", &[]);
    let by = |t: &str, g: &str| t.lines().filter(|l| *l == format!("unary backend={g}")).count() as u64;
    assert_eq!(by(&text, "echo-v1") + by(&text, "echo-v2"), 300, "weight 0 gets nothing: {text}");
    assert_share(by(&text, "echo-v1"), 300, 0.7, "grpcroute-weight: echo-v1", &text);
    assert!(by(&text, "echo-v2") > 0, "echo-v2 answers from node-b, through the tunnel");

    let modifier = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata:
  name: grpc-request-header-modifier
spec:
  parentRefs:
  - name: echo
    port: 7070
  rules:
  - matches:
    - method:
        service: mesh.test.Echo
        method: Say
      headers:
      - name: x-test-case
        value: set
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set:
        - name: x-header-set
          value: set-overwrites-values
    backendRefs:
    - name: echo-v2
      port: 7070
  - matches:
    - method:
        service: mesh.test.Echo
        method: Say
    backendRefs:
    - name: echo-v1
      port: 7070
  - matches:
    - method:
        service: mesh.test.Echo
    backendRefs:
    - name: echo
      port: 7070
"#;
    let out = c.meshctl("node-a", &["apply", "-f", with_routes(modifier).to_str().unwrap()]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = call("3", &["--header", "x-test-case=set", "--header", "x-header-set=old"]);
    assert_eq!(
        text.lines().filter(|l| *l == "unary backend=echo-v2 x-header-set=set-overwrites-values").count(),
        3,
        "the same method with a header match wins; modified, sent across nodes: {text}"
    );
    let text = call("3", &[]);
    assert_eq!(by(&text, "echo-v1"), 3, "matched by service and method: {text}");
    assert!(text.contains("stream backend=echo seqs=1,2,3,4,5"), "Count, by its service alone: {text}");
}

#[test]
fn root_httproute_retry_sends_a_failed_request_to_another_endpoint() {
    let _one = serial();
    let m = mesh();
    let route = |retry: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: retried\nspec:\n  \
             parentRefs: [{{ name: echo, port: 80 }}]\n  rules:\n  - backendRefs: [{{ name: echo-v1, port: 8080 }}]\n{retry}"
        )
    };
    // echo-v1 gets a second endpoint that answers 503 to everything, and
    // no outlier ejection (which would soon keep requests off it).
    let (v1, bad) = (m.c.pod("echo-v1").ip, m.c.pod("bad").ip);
    let apply_with_bad = |r: &str| {
        let doc = document(&m.c, &[r]).replace(
            &format!("endpoints: [{{ ip: {v1}, node: node-a }}]"),
            &format!(
                "endpoints: [{{ ip: {v1}, node: node-a }}, {{ ip: {bad}, node: node-a }}]\n    \
                 http: {{ outlier: {{ consecutive5xx: 0 }} }}"
            ),
        );
        let f = m.c.write_file("retry.yaml", &doc).unwrap();
        let out = m.c.meshctl("node-a", &["apply", "-f", f.to_str().unwrap()]).unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    let mut f = Follower::open(&m.c, "client", &format!("{VIP}:80"), false).unwrap();
    apply_with_bad(&route(""));
    let t = f.batch(40, "/").unwrap();
    assert!(t.get("503").is_some_and(|n| *n > 0), "without retry the bad endpoint's 503s reach the client: {t:?}");
    apply_with_bad(&route("    retry: { codes: [503], attempts: 2, backoff: 1ms }\n"));
    // 12 requests: about 6 retries, within the retry budget (a fifth of
    // the requests plus 10 a second) whatever the draws.
    let t = f.batch(12, "/").unwrap();
    assert_eq!(t, BTreeMap::from([("echo-v1".into(), 12)]), "each 503 retried on the other endpoint");
    let (_, text) = m.d.admin_get("/metrics").unwrap();
    let retries: Vec<&str> = text.lines().filter(|l| l.contains("retries")).collect();
    assert!(m.d.metric("mesh_retries_total", &[]) > 0, "the retries are counted: {retries:?}");
}

const PORTS: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: mesh-split-v1
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: echo-v1
    port: 80
  rules:
  - filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set:
        - name: X-Header-Set
          value: v1
    backendRefs:
    - name: echo-v1
      port: 80
"#;

const FRONTEND: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: mesh-split-v2
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: echo-v2
  rules:
  - filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set:
        - name: X-Header-Set
          value: v2
    backendRefs:
    - name: echo-v2
      port: 80
"#;

#[test]
fn root_mesh_ports_and_mesh_frontend() {
    let _one = serial();
    let m = mesh();
    apply(&m, &[PORTS, FRONTEND]);
    let set = |host: &str| {
        let g = get_at(&m, host, "/", &[]);
        assert_eq!(g.status, 200, "{host}");
        (g.backend().to_owned(), g.headers.get("x-header-set").cloned())
    };
    // mesh-ports: a parentRef with a port takes that port only; one
    // without takes every port.
    assert_eq!(set("10.96.0.11:80"), ("echo-v1".into(), Some("v1".into())));
    assert_eq!(set("10.96.0.11:8080"), ("echo-v1".into(), None), "port 8080 has no route");
    assert_eq!(set("10.96.0.12:80"), ("echo-v2".into(), Some("v2".into())));
    assert_eq!(set("10.96.0.12:8080"), ("echo-v2".into(), Some("v2".into())));
    // mesh-frontend-hostname: the destination decides, not the Host header.
    let g = get_at(&m, "10.96.0.12:80", "/", &[("Host", "echo-v1")]);
    assert_eq!((g.backend(), g.headers.get("x-header-set").map(String::as_str)), ("echo-v2", Some("v2")));
    // mesh-frontend: a route is the Service's: the pod's own address is not routed.
    let pod = format!("{}:8080", m.c.pod("echo-v2").ip);
    assert_eq!(set(&pod), ("echo-v2".into(), None), "to the pod IP");
}

#[test]
fn root_httproute_request_mirror_copies_requests_and_drops_the_answers() {
    let _one = serial();
    let m = mesh();
    let mirror = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: mirrored
spec:
  parentRefs:
  - name: echo
    port: 80
  rules:
  - filters:
    - type: RequestMirror
      requestMirror:
        backendRef:
          name: echo-v2
          port: 8080
    backendRefs:
    - name: echo-v1
      port: 8080
"#;
    apply(&m, &[mirror]);
    let served = |p: &str| mesh_tests::loadgen::backend_counts(&m.c, "client", &[p], "/__count")[p];
    let before = served("echo-v2");
    let mut f = Follower::open(&m.c, "client", &format!("{VIP}:80"), false).unwrap();
    let t = f.batch(20, "/").unwrap();
    assert_eq!(t, BTreeMap::from([("echo-v1".into(), 20)]), "the client gets echo-v1's answers only");
    let copied = mesh_tests::sys::wait_until(Duration::from_secs(5), || served("echo-v2") == before + 20);
    assert!(copied, "echo-v2 got a copy of each: {} -> {}", before, served("echo-v2"));
    let mirrored = m.d.wait_counter("proxy", "mirrored", 20, Duration::from_secs(5), "the copies are counted");
    assert_eq!(mirrored, 20);
    // A request with a body (kept whole, 4 KiB) is copied with it.
    let body = "x".repeat(4096);
    let out =
        m.c.exec(
            "client",
            "curl",
            &["-sS", "--max-time", "5", "--data-binary", &body, &format!("http://{VIP}/")],
            Duration::from_secs(10),
        )
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("backend=echo-v1") && text.contains("received=4096"), "{text}");
    assert_eq!(m.d.wait_counter("proxy", "mirrored", 21, Duration::from_secs(5), "the copy with its body"), 21);
    assert!(mesh_tests::sys::wait_until(Duration::from_secs(5), || served("echo-v2") == before + 21));
    assert_eq!(
        (m.d.counter("proxy", "mirror_failed").unwrap(), m.d.counter("proxy", "mirror_skipped").unwrap()),
        (0, 0)
    );
}

const CONSUMER: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: mesh-echo-add-header
  namespace: consumer
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: echo
    namespace: default
  rules:
  - filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set:
        - name: X-Header-Set
          value: set
    backendRefs:
    - name: echo-v1
      namespace: default
      port: 8080
"#;

const QUERY: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: mesh-query-param-matching
spec:
  parentRefs:
  - name: echo
    port: 80
  rules:
  - matches:
    - queryParams:
      - name: animal
        value: whale
    backendRefs:
    - name: echo-v1
      port: 8080
  - name: dolphins
    matches:
    - queryParams:
      - name: animal
        value: dolphin
    backendRefs:
    - name: echo-v2
      port: 8080
  - matches:
    - path:
        type: PathPrefix
        value: /s303
    filters:
    - type: RequestRedirect
      requestRedirect:
        statusCode: 303
  - matches:
    - path:
        type: PathPrefix
        value: /s308
    filters:
    - type: RequestRedirect
      requestRedirect:
        statusCode: 308
"#;

/// GET `path` on echo's VIP from `pod`: (status, backend, X-Header-Set, Location).
fn from(m: &Mesh, pod: &str, path: &str) -> (u16, String, Option<String>, Option<String>) {
    let url = format!("http://{VIP}{path}");
    let out = m.c.exec(pod, "curl", &["-sS", "--max-time", "5", "-D", "-", &url], Duration::from_secs(10)).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    let status =
        text.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok()).unwrap_or(0);
    let header = |name: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    };
    let backend = text.lines().find_map(|l| l.strip_prefix("backend=")).unwrap_or_default().to_owned();
    (status, backend, header("x-header-set"), header("location"))
}

#[test]
fn root_consumer_route_query_params_named_rules_and_303_308() {
    let _one = serial();
    let m = mesh();
    // The client pod is a workload of namespace consumer; bad, of default.
    let doc = document(&m.c, &[CONSUMER, QUERY])
        .replace("{ name: client, namespace: default,", "{ name: client, namespace: consumer,");
    let f = m.c.write_file("consumer.yaml", &doc).unwrap();
    let out = m.c.meshctl("node-a", &["apply", "-f", f.to_str().unwrap()]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // mesh-consumer-route: the consumer namespace's client takes its own route only.
    for path in ["/", "/?animal=dolphin", "/s303"] {
        assert_eq!(from(&m, "client", path), (200, "echo-v1".into(), Some("set".into()), None), "{path}");
    }
    // The producer routes for everyone else: query params, a named rule, 303 and 308.
    assert_eq!(from(&m, "bad", "/?animal=whale"), (200, "echo-v1".into(), None, None));
    assert_eq!(from(&m, "bad", "/?animal=dolphin"), (200, "echo-v2".into(), None, None));
    assert_eq!(from(&m, "bad", "/?animal=cat").0, 404, "no rule matches");
    assert_eq!(from(&m, "bad", "/s303"), (303, String::new(), None, Some(format!("http://{VIP}/s303"))));
    assert_eq!(from(&m, "bad", "/s308?x=1"), (308, String::new(), None, Some(format!("http://{VIP}/s308?x=1"))));
    let log = m.d.log_with("rule=dolphins", 1);
    assert!(log.lines().any(|l| l.contains("route=default/mesh-query-param-matching rule=dolphins")), "{log}");
}

#[test]
fn root_meshctl_top_shows_each_route_rule_at_its_load() {
    let _one = serial();
    let m = mesh();
    apply(&m, &[SPLIT]);
    // Two loads on the one route for 12 s: /v1 (rule 0) at 100 requests
    // a second, /v2 (rule 1) at 40.
    let load = |path: &str, rps: u32| {
        let n = (rps * 12).to_string();
        let args = ["-c", "1", "-m", "1", "-n", &n, "--rps", &rps.to_string(), &format!("http://{VIP}{path}")];
        m.c.start("client", "h2load", &args).unwrap()
    };
    let (v1, v2) = (load("/v1", 100), load("/v2", 40));
    std::thread::sleep(Duration::from_secs(3));
    let out = m.c.meshctl("node-a", &["-o", "json", "top", "--interval", "5", "--iterations", "1"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "meshctl top: {text}{}", String::from_utf8_lossy(&out.stderr));
    for (l, n) in [(v1, 1200), (v2, 480)] {
        let out = l.wait_with_output().unwrap();
        let (ok, failed, errored) = mesh_tests::loadgen::h2load_counts(&String::from_utf8_lossy(&out.stdout));
        assert_eq!((ok, failed, errored), (n, 0, 0), "{}", String::from_utf8_lossy(&out.stdout));
    }
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    eprintln!("meshctl top: {v}");
    let routes = v["routes"].as_array().unwrap();
    assert_eq!(routes.len(), 2, "{v}");
    for (rule, rate) in [("0", 100.0), ("1", 40.0)] {
        let r = routes
            .iter()
            .find(|r| r["route"] == "default/mesh-split" && r["rule"] == rule)
            .unwrap_or_else(|| panic!("no row for rule {rule}: {v}"));
        let rps = r["requestsPerSecond"].as_f64().unwrap();
        assert!((rps - rate).abs() <= rate * 0.1, "rule {rule}: top says {rps} requests/s of {rate}: {v}");
        assert_eq!(r["successRate"].as_f64(), Some(1.0), "{v}");
        let (p50, p99) = (r["p50Ms"].as_f64().unwrap(), r["p99Ms"].as_f64().unwrap());
        assert!(0.0 < p50 && p50 <= p99, "{v}");
    }
    // The same rows as a table, when piped.
    let out = m.c.meshctl("node-a", &["top", "--interval", "1", "--iterations", "1"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().any(|l| l.starts_with("ROUTE") && l.contains("RULE")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("default/mesh-split")), "{text}");
}
