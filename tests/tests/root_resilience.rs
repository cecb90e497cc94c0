//! Per-request resilience and policy (root, real kernel): retries within a
//! budget, timeouts that cancel upstream, ejection by answers, and the
//! local rate limit, with real clients (h2load, curl, a tonic gRPC client)
//! against mt-http / mt-grpc backends that fail on purpose.

use std::time::{Duration, Instant};

use mesh_tests::loadgen::{backend_counts, h2load_counts, h2load_status};
use mesh_tests::{Cluster, ClusterSpec, Daemon};

const VIP: &str = "10.96.0.40";

// Shares and counts depend on the backends answering at their own pace.
use mesh_tests::one_at_a_time as serial;

struct Mesh {
    d: Daemon,
    c: Cluster,
}

/// Backends web-1.. on node-a, each mt-http with `flags[i]`, behind `web`
/// (VIP:80 -> 8080, `appProtocol: APP`) with `http` as its per-request
/// policy (YAML flow mapping).
fn mesh(app: &str, flags: &[&[&str]], http: &str) -> Mesh {
    mesh_with(app, flags, http, "")
}

/// As [`mesh`], with `extra` (top-level lists, such as `routes:`) added to
/// the document.
fn mesh_with(app: &str, flags: &[&[&str]], http: &str, extra: &str) -> Mesh {
    let mut spec = ClusterSpec::new().node("node-a").pod("client", "node-a");
    let names: Vec<String> = (1..=flags.len()).map(|i| format!("web-{i}")).collect();
    for n in &names {
        spec = spec.pod(n, "node-a");
    }
    let c = Cluster::create(&spec).expect("mini cluster");
    for (n, f) in names.iter().zip(flags) {
        c.serve_http(n, 8080, f).unwrap();
    }
    let eps: Vec<String> = names.iter().map(|n| format!("{{ ip: {}, node: node-a }}", c.pod(n).ip)).collect();
    let svc = format!(
        "  - name: web\n    vip: {VIP}\n    ports: [{{ port: 80, targetPort: 8080, appProtocol: {app} }}]\n    healthCheck: {{ protocol: none }}\n    \
         endpoints: [{}]\n    http: {http}\n",
        eps.join(", ")
    );
    let cfg = c.write_file("mesh.yaml", &format!("{}{extra}", c.config(&svc))).unwrap();
    let d = c.start_daemon("node-a", &cfg, &[]).unwrap();
    Mesh { d, c }
}

/// h2load from the client pod: one connection, one request at a time.
fn h2load(m: &Mesh, extra: &[&str]) -> String {
    let url = format!("http://{VIP}/");
    let mut args = vec!["-c", "1", "-m", "1"];
    args.extend(extra);
    args.push(&url);
    let out = m.c.exec("client", "h2load", &args, Duration::from_secs(180)).unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn metric(d: &Daemon, name: &str) -> u64 {
    d.metric(name, &[])
}

#[test]
fn root_a_backend_failing_30_percent_is_hidden_by_retries_for_bodies_that_fit() {
    let _one = serial();
    let m = mesh(
        "http2",
        &[&["--fail-percent", "30"], &[], &[]],
        "{ retries: { retryOn: [5xx], attempts: 2, methods: [GET, POST] }, outlier: { consecutive5xx: 0 } }",
    );
    let text = h2load(&m, &["-n", "3000"]);
    let (ok, failed, errored) = h2load_counts(&text);
    eprintln!("3000 GETs: {ok} succeeded, {} answered 5xx", h2load_status(&text, "5xx"));
    assert_eq!((h2load_status(&text, "2xx"), failed, errored), (3000, 0, 0), "{text}\n{}", m.d.log_text());
    let retries = metric(&m.d, "mesh_retries_total");
    assert!(retries > 0, "web-1's 503s were retried, not absent");

    // POSTs of 10 KiB: kept whole (under the 64 KiB default) and retried.
    let small = m.c.write_file("small.bin", &"s".repeat(10 << 10)).unwrap();
    let text = h2load(&m, &["-n", "3000", "-d", small.to_str().unwrap()]);
    eprintln!("3000 POSTs of 10 KiB: {} 2xx, {} 5xx", h2load_status(&text, "2xx"), h2load_status(&text, "5xx"));
    assert_eq!(h2load_status(&text, "2xx"), 3000, "{text}");

    // POSTs of 1 MiB: too big to keep, so never retried: the client sees
    // web-1's 503s.
    let big = m.c.write_file("big.bin", &"b".repeat(1 << 20)).unwrap();
    let before = metric(&m.d, "mesh_retries_total");
    let text = h2load(&m, &["-n", "300", "-d", big.to_str().unwrap()]);
    let (ok2, fails) = (h2load_status(&text, "2xx"), h2load_status(&text, "5xx"));
    eprintln!("300 POSTs of 1 MiB: {ok2} 2xx, {fails} 5xx (web-1's 503s, not retried)");
    assert_eq!(ok2 + fails, 300, "{text}");
    assert!(fails > 0, "a third of 300 went to web-1, 30% of those fail: {text}");
    assert!(ok2 >= 200, "the healthy backends answered theirs, and web-1 70% of its: {text}\n{}", m.d.log_text());
    let received = backend_counts(&m.c, "client", &["web-1", "web-2", "web-3"], "/__count");
    eprintln!("served so far: {received:?}");
    assert_eq!(metric(&m.d, "mesh_retries_total"), before, "no 1 MiB request was retried");
}

#[test]
fn root_when_every_backend_fails_retries_stay_within_the_budget() {
    let _one = serial();
    let m = mesh(
        "http2",
        &[&["--status", "503"], &["--status", "503"]],
        "{ retries: { retryOn: [gateway-error], attempts: 2 }, outlier: { consecutive5xx: 0 } }",
    );
    let t0 = Instant::now();
    let text = h2load(&m, &["-n", "1000"]);
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(h2load_status(&text, "5xx"), 1000, "every request ends 503 at the client: {text}");
    let attempts: u64 = backend_counts(&m.c, "client", &["web-1", "web-2"], "/__count").values().sum();
    // Budget: 20% of requests plus 10 retries a second of the run; the
    // tolerance is the second the run started in (its reserve of 10).
    let bound = 1.2 * 1000.0 + 10.0 * secs.ceil() + 10.0;
    eprintln!(
        "1000 requests in {secs:.2} s made {attempts} attempts (bound {bound:.0}); {} retries refused by the budget",
        metric(&m.d, "mesh_retry_budget_exhausted_total")
    );
    assert!(attempts as f64 <= bound, "{attempts} attempts for 1000 requests in {secs:.2} s");
    assert!(attempts > 1000, "some were retried");
    assert!(metric(&m.d, "mesh_retry_budget_exhausted_total") > 0, "the budget refused the rest");
}

#[test]
fn root_a_request_over_its_timeout_gets_504_and_is_cancelled_upstream() {
    let _one = serial();
    // /patient has a route rule of its own, with a longer timeout.
    let patient = "routes:\n  - apiVersion: gateway.networking.k8s.io/v1\n    kind: HTTPRoute\n    metadata: { name: patient }\n    \
                   spec:\n      parentRefs: [{ name: web, port: 80 }]\n      rules:\n        \
                   - matches: [{ path: { type: PathPrefix, value: /patient } }]\n          \
                   backendRefs: [{ name: web, port: 80 }]\n          timeouts: { request: 5s }\n        \
                   - backendRefs: [{ name: web, port: 80 }]\n";
    let m = mesh_with("http", &[&["--delay-ms", "2000"]], "{ timeout: 500ms }", patient);
    let out =
        m.c.exec(
            "client",
            "curl",
            &[
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{time_total}",
                "--max-time",
                "10",
                &format!("http://{VIP}/"),
            ],
            Duration::from_secs(20),
        )
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (code, secs) = text.split_once(' ').unwrap();
    let secs: f64 = secs.parse().unwrap();
    eprintln!("answered {code} after {secs:.3} s");
    assert_eq!(code, "504", "{text}\n{}", m.d.log_text());
    assert!((0.5..1.0).contains(&secs), "504 after {secs} s, not within 0.5-1 s");
    // The backend saw its request go away before it answered.
    let cancelled = mesh_tests::sys::wait_until(Duration::from_secs(5), || {
        backend_counts(&m.c, "client", &["web-1"], "/__cancelled")["web-1"] >= 1
    });
    assert!(cancelled, "the upstream request was not cancelled");
    let (_, metrics) = m.d.admin_get("/metrics").unwrap();
    assert!(metrics.contains("reason=\"timeout\""), "{metrics}");
    // A route rule with a longer timeout waits for the same backend.
    let (code, body) = m.c.curl("client", &format!("http://{VIP}/patient/1")).unwrap();
    assert_eq!((code, body.trim()), (0, "backend=web-1"), "{}", m.d.log_text());
}

#[test]
fn root_a_backend_answering_500_is_ejected_after_5_and_probed_again() {
    let _one = serial();
    let m = mesh("http2", &[&["--status", "500"], &[], &[]], "{ outlier: { consecutive5xx: 5 } }");
    // 50 requests a second for 6 s, one at a time.
    let text = h2load(&m, &["-n", "300", "--rps", "50"]);
    let (ok, fails) = (h2load_status(&text, "2xx"), h2load_status(&text, "5xx"));
    let bad = backend_counts(&m.c, "client", &["web-1"], "/__count")["web-1"];
    eprintln!(
        "300 requests over 6 s: success rate {:.1}% ({ok} 2xx, {fails} 5xx); web-1 answered {bad} (5, then probes)",
        ok as f64 * 100.0 / 300.0
    );
    assert_eq!(ok + fails, 300, "{text}");
    // Without ejection it would get a third (100); it gets its 5, then a
    // probe after each penalty (1 s, doubling).
    assert!(bad >= 6, "web-1 was never probed again after its penalty: {bad}");
    assert!(bad <= 12, "web-1 kept getting requests after 5 failures: {bad}");
    assert!(metric(&m.d, "mesh_breaker_ejections_total") >= 2, "ejected, and again after a failed probe");
}

#[test]
fn root_the_rate_limit_admits_its_rate_and_burst_and_answers_429_with_retry_after() {
    let _one = serial();
    let m = mesh("auto", &[&[]], "{ rateLimit: { requestsPerSecond: 100, burst: 20 } }");
    // 300 a second for 5 s: 20 (burst) + 100 x 5 = 520 admitted.
    let text = h2load(&m, &["-n", "1500", "--rps", "300"]);
    let (ok, limited) = (h2load_status(&text, "2xx"), h2load_status(&text, "4xx"));
    eprintln!("1500 requests at 300/s: {ok} admitted, {limited} got 429");
    assert_eq!(ok + limited, 1500, "{text}");
    assert!((468..=572).contains(&ok), "{ok} admitted, not within 10% of 520");
    assert_eq!(metric(&m.d, "mesh_rate_limited_total"), limited);
    // Over the limit, the answer says when to come back.
    let url = format!("http://{VIP}/");
    let mut args = vec!["-sS", "-o", "/dev/null", "-D", "-", "--max-time", "10"];
    args.extend(std::iter::repeat_n(url.as_str(), 40));
    let out = m.c.exec("client", "curl", &args, Duration::from_secs(20)).unwrap();
    let headers = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(headers.contains(" 429 ") && headers.contains("retry-after: 1"), "{headers}");
}

#[test]
fn root_grpc_unavailable_is_retried_and_a_slow_call_ends_deadline_exceeded() {
    let _one = serial();
    let c = Cluster::create(
        &ClusterSpec::new()
            .node("node-a")
            .pod("client", "node-a")
            .pod("g-1", "node-a")
            .pod("g-2", "node-a")
            .pod("g-3", "node-a"),
    )
    .expect("mini cluster");
    let grpc = c.bins.mt_grpc.clone();
    c.spawn("g-1", &grpc, &["serve", "--name", "g-1", "--port", "50051", "--unavailable"]).unwrap();
    c.spawn("g-2", &grpc, &["serve", "--name", "g-2", "--port", "50051"]).unwrap();
    c.spawn("g-3", &grpc, &["serve", "--name", "g-3", "--port", "50051", "--delay-ms", "2000"]).unwrap();
    for g in ["g-1", "g-2", "g-3"] {
        let p = c.pod(g).clone();
        assert!(mesh_tests::sys::wait_until(Duration::from_secs(10), || mesh_tests::sys::can_connect(
            &p.netns,
            p.addr(50051)
        )));
    }
    let ip = |g: &str| c.pod(g).ip;
    let svc = format!(
        "  - name: echo\n    vip: {VIP}\n    ports: [{{ port: 50051, appProtocol: grpc }}]\n    healthCheck: {{ protocol: none }}\n    \
         endpoints: [{{ ip: {}, node: node-a }}, {{ ip: {}, node: node-a }}]\n    http: {{ retries: {{ attempts: 2 }} }}\n\
         \x20 - name: slow\n    vip: 10.96.0.41\n    ports: [{{ port: 50051, appProtocol: grpc }}]\n    healthCheck: {{ protocol: none }}\n    \
         endpoints: [{{ ip: {}, node: node-a }}]\n    http: {{ timeout: 500ms }}\n",
        ip("g-1"),
        ip("g-2"),
        ip("g-3")
    );
    let cfg = c.write_file("mesh.yaml", &c.config(&svc)).unwrap();
    let d = c.start_daemon("node-a", &cfg, &[]).unwrap();

    // gRPC's default retryOn includes `unavailable`: g-1's failures go to g-2.
    let out =
        c.exec("client", "mt-grpc", &["call", &format!("http://{VIP}:50051"), "50"], Duration::from_secs(60)).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("failed=0"), "{text}\n{}", d.log_text());
    assert_eq!(text.lines().filter(|l| *l == "unary backend=g-2").count(), 50, "{text}");
    assert!(metric(&d, "mesh_retries_total") > 0);

    // The slow service: each unary call ends DEADLINE_EXCEEDED after 500 ms.
    let t0 = Instant::now();
    let out = c.exec("client", "mt-grpc", &["call", "http://10.96.0.41:50051", "2"], Duration::from_secs(60)).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("two slow calls took {:.2} s", t0.elapsed().as_secs_f64());
    assert_eq!(text.lines().filter(|l| l.starts_with("unary status=DeadlineExceeded")).count(), 2, "{text}");
}

#[test]
fn root_a_tcp_port_over_its_rate_limit_resets_new_connections() {
    let _one = serial();
    let m = mesh("tcp", &[&[]], "{ rateLimit: { requestsPerSecond: 5, burst: 5 } }");
    // 20 connections in a row (the backend closes each after its answer).
    let url = format!("http://{VIP}/");
    let mut args =
        vec!["-sS", "-o", "/dev/null", "-w", "%{http_code}\\n", "-H", "Connection: close", "--max-time", "5"];
    args.extend(std::iter::repeat_n(url.as_str(), 20));
    let out = m.c.exec("client", "curl", &args, Duration::from_secs(60)).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let ok = text.lines().filter(|l| *l == "200").count();
    let refused = metric(&m.d, "mesh_rate_limited_total");
    eprintln!("20 connections at once: {ok} answered, {refused} refused");
    assert!((5..=10).contains(&ok), "{ok} answered: {text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(ok as u64 + refused, 20, "each connection was either relayed or refused");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("reset"), "refused connections are reset; curl said:\n{stderr}");
}
