//! Authorization policies (Istio's AuthorizationPolicy shape) on the mini
//! cluster, every decision made twice: with the client on the endpoint's
//! node and on another node. No placement changes a decision, and a
//! denied client reaches nothing (the backend counts none of it).

use std::time::Duration;

use mesh_tests::follow::Follower;
use mesh_tests::loadgen::backend_counts;
use mesh_tests::one_at_a_time as serial;
use mesh_tests::{Cluster, ClusterSpec, Daemon};

/// (service, VIP, endpoint pod): each kind of port once near (the
/// endpoint on the clients' node) and once far (on the other node).
const TCP: [(&str, &str, &str); 2] = [("tcp-near", "10.96.0.20", "web-a"), ("tcp-far", "10.96.0.21", "web-b")];
const H2: [(&str, &str, &str); 2] = [("h2-near", "10.96.0.22", "web-a"), ("h2-far", "10.96.0.23", "web-b")];

const P: &str = "cluster.local/ns/default/sa";

struct Mesh {
    c: Cluster,
    a: Daemon,
    _b: Daemon,
}

/// frontend, admin and other (each its own service account) on node-a
/// with web-a; web-b on node-b. `policies` is the document's list.
fn mesh(policies: &str) -> Mesh {
    mesh_with(|_| policies.to_owned())
}

/// As [`mesh`], the policies written from the cluster once it is made.
fn mesh_with(policies: impl FnOnce(&Cluster) -> String) -> Mesh {
    let c = Cluster::create(
        &ClusterSpec::new()
            .node("node-a")
            .node("node-b")
            .pod("frontend", "node-a")
            .pod("admin", "node-a")
            .pod("other", "node-a")
            .pod("web-a", "node-a")
            .pod("web-b", "node-b"),
    )
    .expect("mini cluster");
    for w in ["web-a", "web-b"] {
        c.serve_http(w, 8080, &[]).unwrap();
    }
    let mut services = String::new();
    for (list, proto) in [(&TCP, "tcp"), (&H2, "http2")] {
        for (name, vip, pod) in list {
            let ip = c.pod(pod).ip;
            let node = if *pod == "web-a" { "node-a" } else { "node-b" };
            services.push_str(&format!(
                "  - name: {name}\n    vip: {vip}\n    ports: [{{ port: 80, targetPort: 8080, appProtocol: {proto} }}]\n    \
                 healthCheck: {{ protocol: none }}\n    endpoints: [{{ ip: {ip}, node: {node} }}]\n"
            ));
        }
    }
    let cfg = c.write_file("mesh.yaml", &format!("{}{}", c.config(&services), policies(&c))).unwrap();
    let a = c.start_daemon("node-a", &cfg, &[]).unwrap();
    let b = c.start_daemon("node-b", &cfg, &[]).unwrap();
    Mesh { c, a, _b: b }
}

/// Applies a state with `services` on both nodes.
fn apply_on_both(m: &Mesh, file: &str, services: &str) {
    let f = m.c.write_file(file, &m.c.config(services)).unwrap();
    for node in ["node-a", "node-b"] {
        let out = m.c.meshctl(node, &["apply", "-f", f.to_str().unwrap()]).unwrap();
        assert!(out.status.success(), "meshctl apply on {node}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// The requests web-a and web-b have answered.
fn served(m: &Mesh) -> (u64, u64) {
    let n = backend_counts(&m.c, "frontend", &["web-a", "web-b"], "/__count");
    (n["web-a"], n["web-b"])
}

/// A request over a `tcp` port (the proxy relays bytes): curl's exit code.
fn tcp(m: &Mesh, pod: &str, vip: &str) -> i32 {
    m.c.curl(pod, &format!("http://{vip}/")).unwrap().0
}

/// HTTP/2 requests from `pod` over one connection held open: (method,
/// path) each, and what each got (the backend's name, or the status).
fn h2(m: &Mesh, pod: &str, vip: &str, reqs: &[(&str, &str)]) -> Vec<String> {
    let mut f = Follower::open(&m.c, pod, &format!("{vip}:80"), true).unwrap();
    reqs.iter()
        .map(|(method, path)| {
            let got = f.batch_of(1, method, path).unwrap();
            got.keys().next().cloned().unwrap_or_default()
        })
        .collect()
}

fn policy(name: &str, spec: &str) -> String {
    format!(
        "  - apiVersion: security.istio.io/v1\n    kind: AuthorizationPolicy\n    metadata: {{ name: {name}, namespace: default }}\n    spec:\n{spec}"
    )
}

#[test]
fn root_each_decision_is_the_same_wherever_client_and_endpoint_run() {
    let _one = serial();
    // On the tcp services: admin is denied (DENY beats ALLOW), frontend
    // allowed, other denied (an ALLOW policy applies and does not name it).
    // On the h2 services: frontend may GET /api/*, admin may POST /admin.
    let policies = format!(
        "policies:\n{}{}{}",
        policy(
            "no-admin-on-tcp",
            &format!("      action: DENY\n      targetRefs: [{{ kind: Service, name: tcp-near }}, {{ kind: Service, name: tcp-far }}]\n      rules: [{{ from: [{{ source: {{ principals: [{P}/admin] }} }}] }}]\n")
        ),
        policy(
            "tcp-clients",
            &format!("      targetRefs: [{{ kind: Service, name: tcp-near }}, {{ kind: Service, name: tcp-far }}]\n      rules: [{{ from: [{{ source: {{ principals: [{P}/frontend, {P}/admin] }} }}] }}]\n")
        ),
        policy(
            "h2-api",
            &format!(
                "      targetRefs: [{{ kind: Service, name: h2-near }}, {{ kind: Service, name: h2-far }}]\n      rules:\n      \
                 - from: [{{ source: {{ principals: [{P}/frontend] }} }}]\n        to: [{{ operation: {{ methods: [GET], paths: ['/api/*'] }} }}]\n      \
                 - from: [{{ source: {{ principals: [{P}/admin] }} }}]\n        to: [{{ operation: {{ methods: [POST], paths: [/admin] }} }}]\n"
            )
        ),
    );
    let m = mesh(&policies);
    let wait = |vip: &str| mesh_tests::sys::wait_until(Duration::from_secs(10), || tcp(&m, "frontend", vip) == 0);
    for (_, vip, _) in TCP {
        assert!(wait(vip), "frontend reaches {vip}\n{}", m.a.log_text());
    }
    let before = served(&m);

    // Connections: the same for both placements, and the denied ones
    // reach nothing.
    for (name, vip, _) in TCP {
        assert_eq!(tcp(&m, "frontend", vip), 0, "{name}: frontend is allowed");
        assert_ne!(tcp(&m, "admin", vip), 0, "{name}: admin is denied by the DENY policy");
        assert_ne!(tcp(&m, "other", vip), 0, "{name}: other matches no ALLOW rule");
    }
    let after = served(&m);
    assert_eq!((after.0 - before.0, after.1 - before.1), (1, 1), "only frontend's connections reached a backend");

    // Requests, over one HTTP/2 connection each: GET /api for frontend,
    // POST /admin for admin only.
    for (name, vip, pod) in H2 {
        let got = h2(&m, "frontend", vip, &[("GET", "/api/users"), ("POST", "/admin"), ("GET", "/other")]);
        assert_eq!(got, [pod, "403", "403"], "{name}: frontend\n{}", m.a.log_text());
        let got = h2(&m, "admin", vip, &[("POST", "/admin"), ("GET", "/api/users")]);
        assert_eq!(got, [pod, "403"], "{name}: admin");
        assert_eq!(h2(&m, "other", vip, &[("GET", "/api/users")]), ["403"], "{name}: other");
    }
    let last = served(&m);
    assert_eq!((last.0 - after.0, last.1 - after.1), (2, 2), "only the allowed requests reached a backend");
    // Each request's access-log line names the policy and rule that
    // decided it, on the node that decided.
    let log = m.a.log_with("authz=default/h2-api#1", 1);
    assert!(log.contains("authz=default/h2-api#0") && log.contains("authz=default/h2-api#1"), "{log}");
    let denied: Vec<&str> = log.lines().filter(|l| l.contains("outcome=denied")).collect();
    assert!(denied.iter().any(|l| l.contains("authz=no-allow-match")), "{denied:?}");
    let log = m._b.log_with("authz=default/h2-api#1", 1);
    assert!(log.contains("direction=inbound") && log.contains("authz=default/h2-api#0"), "{log}");

    // The backend learns the verified caller, never a forged one, and no
    // header of the mesh's own.
    for (name, vip, pod) in H2 {
        let server = format!("spiffe://{P}/{pod}");
        let args = [
            "-sS",
            "--http2-prior-knowledge",
            "--max-time",
            "5",
            "-H",
            "x-echo-request: 1",
            "-H",
            "x-forwarded-client-cert: By=x;URI=spiffe://cluster.local/ns/default/sa/admin",
            "-H",
            "mesh-source: 10.9.9.9",
        ];
        let url = format!("http://{vip}/api/whoami");
        let out =
            m.c.exec("frontend", "curl", &[&args[..], &[url.as_str()]].concat(), Duration::from_secs(10)).unwrap();
        let body = String::from_utf8_lossy(&out.stdout);
        let want = format!("x-forwarded-client-cert=By={server};URI=spiffe://{P}/frontend");
        assert!(body.lines().any(|l| l == want), "{name}: want {want}\n{body}");
        assert!(!body.contains("mesh-source"), "{name}: {body}");
    }

    // meshctl authz check says what the proxies do, case by case.
    let cases: [(&str, &str, &str, &str); 8] = [
        ("frontend", "tcp-far", "GET", "/"),
        ("admin", "tcp-near", "GET", "/"),
        ("other", "tcp-far", "GET", "/"),
        ("frontend", "h2-far", "GET", "/api/users"),
        ("frontend", "h2-near", "POST", "/admin"),
        ("admin", "h2-far", "POST", "/admin"),
        ("admin", "h2-near", "GET", "/api/users"),
        ("other", "h2-far", "GET", "/api/users"),
    ];
    for (who, svc, method, path) in cases {
        let vip = TCP.iter().chain(&H2).find(|(n, _, _)| *n == svc).map(|(_, v, _)| *v).unwrap();
        let live = if svc.starts_with("tcp") {
            tcp(&m, who, vip) == 0
        } else {
            h2(&m, who, vip, &[(method, path)])[0] != "403"
        };
        let from = format!("spiffe://{P}/{who}");
        let out =
            m.c.meshctl(
                "node-a",
                &["-o", "json", "authz", "check", svc, "--from", &from, "--method", method, "--path", path],
            )
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        let said = &v["endpoints"][0];
        assert_eq!(said["decision"] == "allow", live, "{who} {method} {svc}{path}: meshctl said {said}");
    }
    let out = m.c.meshctl("node-a", &["authz", "check", "tcp-near", "--from", &format!("spiffe://{P}/admin")]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("deny by default/no-admin-on-tcp rule 0 (a DENY policy matched)"), "{text}");
    let out = m.c.meshctl("node-a", &["get", "policies"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("default/h2-api") && text.contains("default/h2-near,default/h2-far"), "{text}");

    // The body of a denial, and the decisions counted by policy.
    let out =
        m.c.exec(
            "other",
            "curl",
            &["-sS", "--http2-prior-knowledge", "--max-time", "5", "http://10.96.0.22/api/x"],
            Duration::from_secs(10),
        )
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "RBAC: access denied");
    let denied_by_deny =
        m.a.metric("mesh_authz_decisions_total", &["policy=\"default/no-admin-on-tcp\"", "decision=\"deny\""]);
    assert!(denied_by_deny >= 1, "the same-node DENY is counted on node-a");
}

/// The status of a GET from `pod` to `vip` with `headers` (each NAME:
/// VALUE, given to curl in a file: one argument may not pass 128 KiB),
/// over HTTP/2 with prior knowledge or HTTP/1.1.
fn status_with_headers(m: &Mesh, pod: &str, vip: &str, h2: bool, headers: &[String]) -> String {
    let file = m.c.write_file("headers.txt", &(headers.join("\n") + "\n")).unwrap();
    let at = format!("@{}", file.display());
    let mut args: Vec<&str> = vec!["-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}", "-H", &at];
    if h2 {
        args.push("--http2-prior-knowledge");
    }
    let url = format!("http://{vip}/api/x");
    args.push(&url);
    let out = m.c.exec(pod, "curl", &args, Duration::from_secs(20)).unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn root_request_headers_over_64_kib_get_431_on_both_protocols_and_placements() {
    let _one = serial();
    // No policy: only the header limit decides.
    let m = mesh("");
    let one = |kib: usize| vec![format!("x-big: {}", "a".repeat(kib * 1024))];
    let small: Vec<String> = (0..70).map(|i| format!("x-small-{i:02}: {}", "b".repeat(1000))).collect();
    // An HTTP/1.1 service of each placement, and the HTTP/2 ones.
    let svc = |name: &str, vip: &str, pod: &str, node: &str| {
        format!(
            "  - name: {name}\n    vip: {vip}\n    ports: [{{ port: 80, targetPort: 8080, appProtocol: http }}]\n    \
             healthCheck: {{ protocol: none }}\n    endpoints: [{{ ip: {}, node: {node} }}]\n",
            m.c.pod(pod).ip
        )
    };
    let mut doc = String::new();
    for (name, vip, pod) in TCP.iter().chain(&H2) {
        let node = if *pod == "web-a" { "node-a" } else { "node-b" };
        let proto = if name.starts_with("h2") { "http2" } else { "http" };
        doc.push_str(&svc(name, vip, pod, node).replace("appProtocol: http ", &format!("appProtocol: {proto} ")));
    }
    apply_on_both(&m, "h1.yaml", &doc);
    let before = served(&m);
    // tcp-near/tcp-far now speak HTTP/1.1 (curl); h2-near/h2-far HTTP/2,
    // from a hyper client (curl's nghttp2 will not send a header block
    // over 64 KiB at all).
    for (name, vip, pod) in TCP {
        assert_eq!(status_with_headers(&m, "frontend", vip, false, &one(200)), "431", "{name}: one 200 KiB header");
        assert_eq!(status_with_headers(&m, "frontend", vip, false, &small), "431", "{name}: 70 headers of 1000 bytes");
        assert_eq!(status_with_headers(&m, "frontend", vip, false, &one(60)), "200", "{name}: 60 KiB passes ({pod})");
    }
    for (name, vip, pod) in H2 {
        let mut f = Follower::open(&m.c, "frontend", &format!("{vip}:80"), true).unwrap();
        let got =
            |f: &mut Follower, pad: &str| f.batch_padded(1, "GET", "/api/x", pad).unwrap().into_keys().next().unwrap();
        assert_eq!(got(&mut f, "1x204800"), "431", "{name}: one 200 KiB header");
        assert_eq!(got(&mut f, "70x1000"), "431", "{name}: 70 headers of 1000 bytes");
        assert_eq!(got(&mut f, "1x61440"), pod, "{name}: 60 KiB passes, on the same connection");
    }
    let after = served(&m);
    assert_eq!((after.0 - before.0, after.1 - before.1), (2, 2), "only the 60 KiB requests reached a backend");
    assert_eq!(m.a.counter("proxy", "headers_too_large").unwrap(), 8, "every 431 is counted");
    let log = m.a.log_text();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("request headers over the limit")).collect();
    assert_eq!(lines.len(), 1, "logged once for the one client: {lines:?}");
    assert!(lines[0].contains(&m.c.pod("frontend").ip.to_string()), "naming it: {lines:?}");
    // Far past the limit, HTTP/2 refuses it too (431, or h2 itself closes
    // the connection); nothing reaches a backend.
    let mut f = Follower::open(&m.c, "frontend", "10.96.0.22:80", true).unwrap();
    let got = f.batch_padded(1, "GET", "/api/x", "1x307200").unwrap();
    assert!(got.keys().all(|k| k == "431" || k.starts_with("error:")), "{got:?}");
    assert_eq!(served(&m), after);
    // The limit a client is told: h2 decodes more, so that the proxy
    // answers the 431s itself, but the SETTINGS say 64 KiB.
    let url = format!("http://{}/api/x", H2[0].1);
    let out = m.c.exec("frontend", "nghttp", &["-nv", &url], Duration::from_secs(20)).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let settings: Vec<&str> = text.lines().filter(|l| l.contains("SETTINGS_")).collect();
    assert!(
        text.contains("[SETTINGS_MAX_HEADER_LIST_SIZE(0x06):65536]"),
        "the proxy's SETTINGS advertise --max-request-headers: {settings:?}"
    );
}

#[test]
fn root_order_audit_dry_run_addresses_and_no_ejection_on_both_placements() {
    let _one = serial();
    let targets = "      targetRefs: [{ kind: Service, name: h2-near }, { kind: Service, name: h2-far }]\n";
    // Everyone but `other` may call; `other` only on /ip-ok, and only
    // from its own address (believed across nodes only because a
    // workload of its identity has it). A header denies anyone; /api is
    // audited; a dry-run DENY of admin is reported, not enforced.
    let other_ip = "OTHER_IP";
    let policies = format!(
        "policies:\n{}{}{}{}",
        policy(
            "callers",
            &format!(
                "{targets}      rules:\n      - from: [{{ source: {{ notPrincipals: [{P}/other] }} }}]\n      \
                 - from: [{{ source: {{ ipBlocks: [{other_ip}/32] }} }}]\n        to: [{{ operation: {{ paths: [/ip-ok] }} }}]\n"
            )
        ),
        policy(
            "no-debug",
            &format!("{targets}      action: DENY\n      rules: [{{ when: [{{ key: 'request.headers[x-debug]', values: ['1'] }}] }}]\n")
        ),
        policy("audit-api", &format!("{targets}      action: AUDIT\n      rules: [{{ to: [{{ operation: {{ paths: ['/api/*'] }} }}] }}]\n")),
        policy(
            "dry-admin",
            &format!("{targets}      action: DENY\n      rules: [{{ from: [{{ source: {{ principals: [{P}/admin] }} }}] }}]\n")
        )
        .replace("name: dry-admin, namespace: default }", "name: dry-admin, namespace: default, annotations: { istio.io/dry-run: \"true\" } }"),
    );
    // The address is known only once the cluster is made: write it then.
    let m = mesh_with(|c| policies.replace(other_ip, &c.pod("other").ip.to_string()));
    let b = &m._b;
    let get = |pod: &str, vip: &str, path: &str, headers: &[&str]| {
        let mut args =
            vec!["-sS", "--http2-prior-knowledge", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}"];
        for h in headers {
            args.extend(["-H", h]);
        }
        let url = format!("http://{vip}{path}");
        args.push(&url);
        String::from_utf8_lossy(&m.c.exec(pod, "curl", &args, Duration::from_secs(10)).unwrap().stdout).into_owned()
    };
    for (name, vip, _) in H2 {
        assert_eq!(get("frontend", vip, "/api/a", &[]), "200", "{name}");
        assert_eq!(get("frontend", vip, "/api/a", &["x-debug: 1"]), "403", "{name}: DENY on a header");
        assert_eq!(get("other", vip, "/x", &[]), "403", "{name}: notPrincipals leaves other out");
        assert_eq!(get("other", vip, "/ip-ok", &[]), "200", "{name}: other's own address");
        assert_eq!(get("admin", vip, "/x", &[]), "200", "{name}: a dry-run DENY does not deny");
    }
    let log = m.a.log_with("dry-run policy would decide otherwise", 1);
    assert!(log.contains("dry-run policy would decide otherwise"), "{log}");
    let audited =
        |d: &Daemon| d.metric("mesh_authz_decisions_total", &["policy=\"default/audit-api\"", "decision=\"audit\""]);
    assert!(audited(&m.a) >= 2 && audited(b) >= 2, "AUDIT counted on both nodes: {} {}", audited(&m.a), audited(b));
    // And named in the access-log line of each request it matched, allowed
    // or denied, where the request was decided: node-a for h2-near, node-b
    // for h2-far.
    for (node, d) in [("node-a", &m.a), ("node-b", b)] {
        let log = d.log_with("audit=default/audit-api#0", 2);
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("audit=")).collect();
        assert_eq!(lines.len(), 2, "{node}: {lines:?}");
        assert!(lines.iter().all(|l| l.contains("path=/api/a")), "{node}: {lines:?}");
        assert!(lines.iter().any(|l| l.contains("status=403")), "{node}: the denied one too: {lines:?}");
    }

    // 300 denied requests, then 30 allowed ones: a denial never counts
    // against an endpoint, so none of them fails.
    // Each decision is counted by the node that made it: 300 with no
    // ALLOW policy matching, 30 allowed by `callers`.
    let decisions = |d: &Daemon| {
        let allow = d.metric("mesh_authz_decisions_total", &["policy=\"default/callers\"", "decision=\"allow\""]);
        let none = d.metric("mesh_authz_decisions_total", &["policy=\"\"", "decision=\"deny\""]);
        (allow, none)
    };
    for (name, vip, pod) in H2 {
        let d = if name == "h2-near" { &m.a } else { b };
        let before = decisions(d);
        let mut denied = Follower::open(&m.c, "other", &format!("{vip}:80"), true).unwrap();
        assert_eq!(denied.batch(300, "/x").unwrap(), [("403".to_owned(), 300)].into(), "{name}");
        let mut allowed = Follower::open(&m.c, "frontend", &format!("{vip}:80"), true).unwrap();
        assert_eq!(allowed.batch(30, "/y").unwrap(), [(pod.to_owned(), 30)].into(), "{name}: 0 of 30 failed");
        let after = decisions(d);
        assert_eq!((after.0 - before.0, after.1 - before.1), (30, 300), "{name}: counted where decided");
    }
}

#[test]
fn root_grpc_a_method_denied_with_permission_denied_another_allowed_on_both_placements() {
    let _one = serial();
    let c = Cluster::create(
        &ClusterSpec::new()
            .node("node-a")
            .node("node-b")
            .pod("client", "node-a")
            .pod("g-a", "node-a")
            .pod("g-b", "node-b"),
    )
    .expect("mini cluster");
    for g in ["g-a", "g-b"] {
        c.spawn(g, &c.bins.mt_grpc.clone(), &["serve", "--name", g, "--port", "50051"]).unwrap();
        let p = c.pod(g).clone();
        assert!(mesh_tests::sys::wait_until(Duration::from_secs(10), || mesh_tests::sys::can_connect(
            &p.netns,
            p.addr(50051)
        )));
    }
    let mut doc = String::new();
    for (name, vip, pod, node) in [("g-near", "10.96.0.40", "g-a", "node-a"), ("g-far", "10.96.0.41", "g-b", "node-b")]
    {
        doc.push_str(&format!(
            "  - name: {name}\n    vip: {vip}\n    ports: [{{ port: 50051, appProtocol: grpc }}]\n    healthCheck: {{ protocol: none }}\n    \
             endpoints: [{{ ip: {}, node: {node} }}]\n",
            c.pod(pod).ip
        ));
    }
    // The client may Say, and nothing else (Count is denied).
    let policies = format!(
        "policies:\n{}",
        policy(
            "say-only",
            &format!(
                "      targetRefs: [{{ kind: Service, name: g-near }}, {{ kind: Service, name: g-far }}]\n      \
                 rules: [{{ from: [{{ source: {{ principals: [{P}/client] }} }}], to: [{{ operation: {{ paths: [/mesh.test.Echo/Say] }} }}] }}]\n"
            )
        )
    );
    let cfg = c.write_file("mesh.yaml", &format!("{}{policies}", c.config(&doc))).unwrap();
    let a = c.start_daemon("node-a", &cfg, &[]).unwrap();
    let _b = c.start_daemon("node-b", &cfg, &[]).unwrap();
    for (name, vip, pod) in [("g-near", "10.96.0.40", "g-a"), ("g-far", "10.96.0.41", "g-b")] {
        let out = c
            .exec("client", "mt-grpc", &["call", &format!("http://{vip}:50051"), "3"], Duration::from_secs(30))
            .unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let said = stdout.lines().filter(|l| *l == format!("unary backend={pod}")).count();
        assert_eq!(said, 3, "{name}: Say is allowed\n{stdout}{stderr}\n{}", a.log_text());
        assert!(stderr.contains("stream: PermissionDenied RBAC: access denied"), "{name}: Count is denied: {stderr}");
    }
}

#[test]
fn root_a_services_authorization_holds_on_the_endpoints_node_too() {
    let _one = serial();
    // The first finding: `authorization` allowing only one
    // identity let a pod of another through when it ran on the
    // endpoint's node. It is an ALLOW policy of the service now.
    let m = mesh("");
    let mut doc = String::new();
    for (name, vip, pod) in TCP {
        let node = if pod == "web-a" { "node-a" } else { "node-b" };
        doc.push_str(&format!(
            "  - name: {name}\n    vip: {vip}\n    ports: [{{ port: 80, targetPort: 8080 }}]\n    healthCheck: {{ protocol: none }}\n    \
             authorization: {{ identities: [\"spiffe://{P}/frontend\"] }}\n    endpoints: [{{ ip: {}, node: {node} }}]\n",
            m.c.pod(pod).ip
        ));
    }
    apply_on_both(&m, "legacy.yaml", &doc);
    let before = served(&m);
    for (name, vip, _) in TCP {
        assert_eq!(tcp(&m, "frontend", vip), 0, "{name}: frontend is allowed");
        assert_ne!(tcp(&m, "other", vip), 0, "{name}: other is not, wherever it runs");
    }
    let after = served(&m);
    assert_eq!((after.0 - before.0, after.1 - before.1), (1, 1), "other reached nothing");
    let out = m.c.meshctl("node-a", &["get", "policies", "-o", "json"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("default/tcp-near.authorization"), "{text}");
}
