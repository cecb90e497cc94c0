//! End-to-end tests of the request-aware path (root, real kernel): real
//! clients (nghttp for HTTP/2, curl for HTTP/1.1 keep-alive) on one
//! connection each, and the proxy balancing every request on its own.

use std::collections::BTreeMap;
use std::time::Duration;

use mesh_tests::{Cluster, ClusterSpec, Daemon};

const VIP: &str = "10.96.0.10";

// Shares and counts depend on the backends answering at their own pace.
use mesh_tests::one_at_a_time as serial;

struct Http {
    d: Daemon,
    c: Cluster,
}

/// client, web-1 and web-2 (mt-http on 8080) on one node; service `web`
/// (VIP:80 -> 8080, `appProtocol: APP`) with weights 3:2.
fn http(app: &str) -> Http {
    let c = Cluster::create(
        &ClusterSpec::new().node("node-a").pod("client", "node-a").pod("web-1", "node-a").pod("web-2", "node-a"),
    )
    .expect("mini cluster");
    c.serve_http("web-1", 8080, &[]).unwrap();
    c.serve_http("web-2", 8080, &[]).unwrap();
    let (a, b) = (c.pod("web-1").ip, c.pod("web-2").ip);
    let svc = format!(
        "  - name: web\n    vip: {VIP}\n    ports: [{{ port: 80, targetPort: 8080, appProtocol: {app} }}]\n    healthCheck: {{ protocol: none }}\n    \
         endpoints: [{{ ip: {a}, node: node-a, weight: 3 }}, {{ ip: {b}, node: node-a, weight: 2 }}]\n"
    );
    let cfg = c.write_file("mesh.yaml", &c.config(&svc)).unwrap();
    let d = c.start_daemon("node-a", &cfg, &[]).unwrap();
    Http { d, c }
}

/// Who answered, from bodies of `backend=NAME` lines.
fn tally(out: &str) -> BTreeMap<String, u64> {
    let mut t = BTreeMap::new();
    for name in out.lines().filter_map(|l| l.strip_prefix("backend=")) {
        *t.entry(name.to_owned()).or_insert(0) += 1;
    }
    t
}

fn assert_3_to_2(t: &BTreeMap<String, u64>, n: u64, what: &str) {
    let total: u64 = t.values().sum();
    assert_eq!(total, n, "{what}: every request answered: {t:?}");
    mesh_tests::loadgen::assert_share(*t.get("web-1").unwrap_or(&0), n, 0.6, &format!("{what}: web-1"), t);
}

/// Requests each backend answered, asked of it directly (pod to pod).
fn served(c: &Cluster, pods: &[&str]) -> BTreeMap<String, u64> {
    mesh_tests::loadgen::backend_counts(c, "client", pods, "/__count")
}

#[test]
fn root_one_http2_connection_spreads_its_requests_by_weight() {
    let _one = serial();
    let h = http("http2");
    // h2load: one HTTP/2 connection (prior knowledge), 2000 requests, one
    // stream at a time: every request is balanced on its own. (With many
    // streams in flight these single-threaded backends are the bottleneck,
    // each serves what it can, and latency, rightly, decides; the
    // latency-aware tests show that.)
    let out =
        h.c.exec(
            "client",
            "h2load",
            &["-c", "1", "-m", "1", "-n", "2000", &format!("http://{VIP}/")],
            Duration::from_secs(120),
        )
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && text.contains("2000 succeeded"), "h2load: {text}\n{}", h.d.log_text());
    assert!(text.contains("status codes: 2000 2xx"), "{text}");
    let t = served(&h.c, &["web-1", "web-2"]);
    assert_3_to_2(&t, 2000, "HTTP/2, one connection");
    assert_eq!(h.d.counter("proxy", "accepted").unwrap(), 1, "one client connection");
    let (_, m) = h.d.admin_get("/metrics").unwrap();
    let count = |needle: &str| mesh_tests::sys::metric_sum(&m, "mesh_requests_total", &[needle]);
    assert_eq!(count("class=\"2xx\""), 2000, "{m}");
    assert_eq!(count(&format!("endpoint=\"{}:8080\"", h.c.pod("web-1").ip)), t["web-1"], "{m}");
    // promtool agrees the request metrics are valid exposition format.
    mesh_tests::sys::promtool_check(&m).unwrap().unwrap_or_else(|e| panic!("promtool: {e}"));
    // meshctl stats shows the requests and their success rate per endpoint.
    let out = h.c.meshctl("node-a", &["stats", "-o", "json"]).unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let total: u64 = rows.as_array().unwrap().iter().filter_map(|r| r["requests"].as_u64()).sum();
    assert_eq!(total, 2000, "{rows}");
    let with_requests = rows.as_array().unwrap().iter().filter(|r| r["requests"].as_u64() > Some(0));
    assert!(
        with_requests.clone().count() == 2
            && with_requests.clone().all(|r| r["successRate"].as_f64() == Some(1.0))
            && with_requests
                .clone()
                .all(|r| r["p50Ms"].as_f64() > Some(0.0) && r["p99Ms"].as_f64() >= r["p50Ms"].as_f64()),
        "{rows}"
    );
}

#[test]
fn root_one_http1_keepalive_connection_spreads_its_requests_by_weight() {
    let _one = serial();
    let h = http("http");
    // curl sends every URL of one invocation over the same kept-alive connection.
    let url = format!("http://{VIP}/");
    let urls: Vec<&str> = std::iter::repeat_n(url.as_str(), 2000).collect();
    let mut args = vec!["-sS", "--max-time", "60"];
    args.extend(urls);
    let out = h.c.exec("client", "curl", &args, Duration::from_secs(90)).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    assert_3_to_2(&tally(&text), 2000, "HTTP/1.1 keep-alive, one connection");
    assert_eq!(h.d.counter("proxy", "accepted").unwrap(), 1, "one client connection");
}

#[test]
fn root_auto_detects_http1_http2_and_falls_back_to_tcp_for_a_silent_client() {
    let _one = serial();
    let c = Cluster::create(&ClusterSpec::new().node("node-a").pod("client", "node-a").pod("web-1", "node-a"))
        .expect("mini cluster");
    c.serve_http("web-1", 8080, &[]).unwrap();
    // A server-speaks-first backend: echo-now answers only what it gets,
    // so use mt-pod's HTTP server on another port for the TCP fallback.
    c.serve("web-1", 8081, None).unwrap();
    let w = c.pod("web-1").ip;
    let svc = format!(
        "  - name: web\n    vip: {VIP}\n    ports: [{{ port: 80, targetPort: 8080, appProtocol: auto }}, {{ port: 81, targetPort: 8081, appProtocol: auto }}]\n    \
         healthCheck: {{ protocol: none }}\n    endpoints: [{{ ip: {w}, node: node-a }}]\n"
    );
    let cfg = c.write_file("mesh.yaml", &c.config(&svc)).unwrap();
    let d = c.start_daemon("node-a", &cfg, &["--protocol-detect-timeout", "300ms"]).unwrap();
    let (code, body) = c.curl("client", &format!("http://{VIP}/")).unwrap();
    assert_eq!((code, body.trim()), (0, "backend=web-1"), "HTTP/1.1 detected");
    let out = c.exec("client", "nghttp", &[&format!("http://{VIP}/")], Duration::from_secs(20)).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "backend=web-1", "HTTP/2 detected");
    let (_, m) = d.admin_get("/metrics").unwrap();
    let requests = mesh_tests::sys::metric_sum(&m, "mesh_requests_total", &["default/web:80"]);
    assert_eq!(requests, 2, "both went through the request path: {m}");
    // A client that waits for the server to speak first: after the
    // detection timeout the connection is relayed as bytes, and then the
    // client's request (sent late) is answered by the backend.
    let out = c.exec("client", "mt-pod", &["late", &format!("{VIP}:81"), "800"], Duration::from_secs(20)).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && text.contains("backend=web-1"), "{text}\n{}", d.log_text());
    let (_, m) = d.admin_get("/metrics").unwrap();
    assert!(
        m.lines().any(|l| l.starts_with("mesh_connections_opened_total{") && l.contains("default/web:81")),
        "the silent client went the TCP way: {m}"
    );
}

/// `n` HTTP/2 backends web-1.. on `node-a` behind `web` (http2, equal
/// weights); `delays[i]` ms added to backend i's answers.
fn backends(delays: &[u64]) -> Http {
    let mut spec = ClusterSpec::new().node("node-a").pod("client", "node-a");
    let names: Vec<String> = (1..=delays.len()).map(|i| format!("web-{i}")).collect();
    for n in &names {
        spec = spec.pod(n, "node-a");
    }
    let c = Cluster::create(&spec).expect("mini cluster");
    for (n, d) in names.iter().zip(delays) {
        c.serve_http(n, 8080, &["--delay-ms", &d.to_string()]).unwrap();
    }
    let eps: Vec<String> = names.iter().map(|n| format!("{{ ip: {}, node: node-a }}", c.pod(n).ip)).collect();
    let svc = format!(
        "  - name: web\n    vip: {VIP}\n    ports: [{{ port: 80, targetPort: 8080, appProtocol: http2 }}]\n    healthCheck: {{ protocol: none }}\n    \
         endpoints: [{}]\n",
        eps.join(", ")
    );
    let cfg = c.write_file("mesh.yaml", &c.config(&svc)).unwrap();
    let d = c.start_daemon("node-a", &cfg, &[]).unwrap();
    Http { d, c }
}

use mesh_tests::loadgen::h2load_counts;

#[test]
fn root_a_killed_backend_fails_no_request_of_a_steady_http2_connection() {
    let _one = serial();
    let h = backends(&[0, 0, 0]);
    // One connection, 100 requests a second for 8 s, one at a time.
    let load =
        h.c.start("client", "h2load", &["-c", "1", "-m", "1", "-n", "800", "--rps", "100", &format!("http://{VIP}/")])
            .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let before = served(&h.c, &["web-3"])["web-3"];
    assert!(before > 0, "web-3 served before it was killed");
    h.c.kill(h.c.spawned_pid_of("web-3").unwrap());
    let out = load.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (ok, failed, errored) = h2load_counts(&text);
    eprintln!("after killing web-3: {ok} succeeded, {failed} failed, {errored} errored");
    // One request at a time: none can be in flight on web-3 when it dies
    // unless it had just accepted it; such a request may fail, no other.
    assert!(failed + errored <= 1, "requests failed: {text}\n{}", h.d.log_text());
    assert_eq!(ok + failed + errored, 800, "{text}");
    // Succeeded means answered: every answer but the one allowed is a 2xx
    // (a 503 for want of an endpoint would be a failure the client saw).
    let ok_2xx: u64 = text
        .lines()
        .find_map(|l| {
            l.trim().strip_prefix("status codes:")?.split(',').next()?.trim().strip_suffix(" 2xx")?.parse().ok()
        })
        .unwrap_or(0);
    assert!(ok_2xx + 1 >= 800, "{ok_2xx} of 800 answered 2xx: {text}");
    // No request failed because the ones that met the dead web-3 went to
    // another endpoint.
    assert!(h.d.counter("proxy", "retries").unwrap() >= 1, "{}", h.d.stats().unwrap());
    // web-3 served `before` by the time it was counted, and at most a few
    // more in the moment until it was killed; web-1 and web-2 the rest.
    let after = served(&h.c, &["web-1", "web-2"]);
    let others = after.values().sum::<u64>();
    assert!(
        others + before <= ok && ok - (others + before) <= 3,
        "every other request went to web-1 or web-2: {after:?}, web-3 {before} before the kill, {ok} succeeded"
    );
}

#[test]
fn root_a_slower_backend_gets_fewer_requests_of_one_http2_connection() {
    let _one = serial();
    // web-2 answers 50 ms late; equal weights.
    let h = backends(&[0, 50]);
    let out =
        h.c.exec(
            "client",
            "h2load",
            &["-c", "1", "-m", "10", "-n", "1000", &format!("http://{VIP}/")],
            Duration::from_secs(120),
        )
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(h2load_counts(&text), (1000, 0, 0), "{text}");
    let t = served(&h.c, &["web-1", "web-2"]);
    eprintln!("1000 requests, 10 at a time: {t:?} (equal weights; web-2 50 ms slower)");
    // Its weight's share is 500; chance alone would keep it near that.
    assert!(t["web-2"] < 250, "the slower backend got {} of 1000, near its weight's share of 500", t["web-2"]);
}

#[test]
fn root_an_upgraded_connection_is_relayed_as_bytes() {
    let _one = serial();
    let h = http("http");
    let out = h.c.exec("client", "mt-pod", &["upgrade", &format!("{VIP}:80")], Duration::from_secs(20)).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(text.trim(), "upgraded echo=ping-mesh", "{}", h.d.log_text());
    // That connection left HTTP; new ones still have their requests routed.
    let (code, body) = h.c.curl("client", &format!("http://{VIP}/")).unwrap();
    assert_eq!(code, 0, "{body}");
    assert!(body.starts_with("backend=web-"), "{body}");
}

/// The receiving node forwards a stream's requests over its pooled
/// connections to the pod; a pod that ends its connections (here after
/// every 3 requests, as nginx's `keepalive_requests` and
/// `http2_max_requests` do after 1000) is dialled again, so every request
/// of one client connection is answered, on HTTP/1.1 and on HTTP/2.
#[test]
fn root_a_workload_that_ends_its_connections_still_answers_every_request_through_the_tunnel() {
    let _one = serial();
    let c = Cluster::create(
        &ClusterSpec::new().node("node-a").node("node-b").pod("client", "node-a").pod("web-2", "node-b"),
    )
    .expect("mini cluster");
    c.serve_http("web-2", 8080, &["--max-requests", "3"]).unwrap();
    let w = c.pod("web-2").ip;
    let svc = |name: &str, vip: &str, app: &str| {
        format!(
            "  - name: {name}\n    vip: {vip}\n    ports: [{{ port: 80, targetPort: 8080, appProtocol: {app} }}]\n    \
             healthCheck: {{ protocol: none }}\n    endpoints: [{{ ip: {w}, node: node-b }}]\n"
        )
    };
    let h2_vip = "10.96.0.11";
    let services = [svc("web", VIP, "http"), svc("web-h2", h2_vip, "http2")].concat();
    let cfg = c.write_file("mesh.yaml", &c.config(&services)).unwrap();
    let _a = c.start_daemon("node-a", &cfg, &[]).unwrap();
    let b = c.start_daemon("node-b", &cfg, &[]).unwrap();
    for (vip, h2) in [(VIP, false), (h2_vip, true)] {
        // One client connection, so one tunnel stream on node-b.
        let mut f = mesh_tests::follow::Follower::open(&c, "client", &format!("{vip}:80"), h2).unwrap();
        let got = f.batch(12, "/").unwrap();
        assert_eq!(
            got.get("web-2"),
            Some(&12),
            "HTTP/2 {h2}: every request answered by the pod: {got:?}\n{}",
            b.log_text()
        );
        assert_eq!(got.len(), 1, "HTTP/2 {h2}: {got:?}");
    }
    // The pod did end its connections: 24 requests, at most 3 on each,
    // and the question's own connection.
    let conns = mesh_tests::loadgen::backend_counts(&c, "client", &["web-2"], "/__connections")["web-2"];
    assert!(conns > 24 / 3, "connections the pod accepted: {conns}");
}

#[test]
fn root_requests_through_the_tunnel_are_proxied_counted_and_logged_on_the_receiving_node() {
    let _one = serial();
    let c = Cluster::create(
        &ClusterSpec::new().node("node-a").node("node-b").pod("client", "node-a").pod("web-2", "node-b"),
    )
    .expect("mini cluster");
    c.serve_http("web-2", 8080, &[]).unwrap();
    let w = c.pod("web-2").ip;
    let svc = format!(
        "  - name: web\n    vip: {VIP}\n    ports: [{{ port: 80, targetPort: 8080, appProtocol: http }}]\n    healthCheck: {{ protocol: none }}\n    \
         endpoints: [{{ ip: {w}, node: node-b }}]\n"
    );
    let cfg = c.write_file("mesh.yaml", &c.config(&svc)).unwrap();
    let a = c.start_daemon("node-a", &cfg, &[]).unwrap();
    let b = c.start_daemon("node-b", &cfg, &["--log-format", "json"]).unwrap();

    // One keep-alive connection: 30 answered 200, 10 answered 404.
    let (ok, missing) = (format!("http://{VIP}/"), format!("http://{VIP}/status/404"));
    let mut args = vec!["-sS", "--max-time", "60"];
    args.extend(std::iter::repeat_n(ok.as_str(), 30));
    args.extend(std::iter::repeat_n(missing.as_str(), 10));
    let out = c.exec("client", "curl", &args, Duration::from_secs(90)).unwrap();
    assert!(out.status.success(), "curl: {}\n{}", String::from_utf8_lossy(&out.stderr), b.log_text());
    assert_eq!(tally(&String::from_utf8_lossy(&out.stdout)).get("web-2"), Some(&40));
    // A request body crosses both proxies whole.
    let body = "x".repeat(5000);
    let out =
        c.exec("client", "curl", &["-sS", "--max-time", "10", "--data", &body, &ok], Duration::from_secs(20)).unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("received=5000"), "{}", b.log_text());

    let count = |d: &Daemon, direction: &str, class: &str| {
        let (direction, class) = (format!("direction=\"{direction}\""), format!("class=\"{class}\""));
        d.metric("mesh_requests_total", &[&direction, &class])
    };
    let counted = mesh_tests::sys::wait_until(Duration::from_secs(5), || count(&b, "inbound", "2xx") == 31);
    assert!(counted, "{}", b.admin_get("/metrics").unwrap().1);
    assert_eq!(count(&b, "inbound", "4xx"), 10);
    assert_eq!((count(&a, "outbound", "2xx"), count(&a, "outbound", "4xx")), (31, 10));
    let (_, m) = b.admin_get("/metrics").unwrap();
    assert!(
        m.lines().any(|l| l.starts_with("mesh_response_latency_seconds_count{")
            && l.contains("direction=\"inbound\"")
            && l.ends_with(" 41")),
        "{m}"
    );
    mesh_tests::sys::promtool_check(&m).unwrap().unwrap_or_else(|e| panic!("promtool: {e}"));

    // One access-log line per request on the receiving node, with the
    // client's identity as the tunnel proved it.
    let lines: Vec<serde_json::Value> = b
        .log_text()
        .lines()
        .filter(|l| l.contains("\"target\":\"access\""))
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v["fields"]["message"] == "request" && v["fields"]["direction"] == "inbound")
        .collect();
    assert_eq!(lines.len(), 41, "{}", b.log_text());
    assert!(lines.iter().all(|v| v["fields"]["identity"] == "spiffe://cluster.local/ns/default/sa/client"));
    assert_eq!(lines.iter().filter(|v| v["fields"]["status"] == 404).count(), 10);
    assert!(lines.iter().all(|v| v["fields"]["path"] == "/" || v["fields"]["path"] == "/status/404"));

    // meshctl stats on the receiving node: the inbound requests and their rate.
    let out = c.meshctl("node-b", &["stats", "-o", "json"]).unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = rows.as_array().unwrap().iter().find(|r| r["direction"] == "inbound").expect("inbound row");
    assert_eq!(row["requests"].as_u64(), Some(41), "{rows}");
    assert!(row["ratePerSecond"].as_f64() > Some(0.0), "{rows}");
    // Pooled: the requests shared one tunnel stream (two at most).
    assert!(b.counter("tunnel", "streams").unwrap() <= 2);

    // An upgrade crosses as bytes, not as requests.
    let out = c.exec("client", "mt-pod", &["upgrade", &format!("{VIP}:80")], Duration::from_secs(20)).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "upgraded echo=ping-mesh", "{}", b.log_text());
}

#[test]
fn root_a_request_with_a_body_whose_connect_failed_goes_whole_to_another_endpoint() {
    let _one = serial();
    let c = Cluster::create(
        &ClusterSpec::new().node("node-a").pod("client", "node-a").pod("web-1", "node-a").pod("gone", "node-a"),
    )
    .expect("mini cluster");
    c.serve_http("web-1", 8080, &[]).unwrap();
    // Nothing listens on `gone`, which has most of the weight: most
    // requests try it first, and its connect is refused.
    let (w, g) = (c.pod("web-1").ip, c.pod("gone").ip);
    let svc = format!(
        "  - name: web\n    vip: {VIP}\n    ports: [{{ port: 80, targetPort: 8080, appProtocol: http }}]\n    healthCheck: {{ protocol: none }}\n    \
         endpoints: [{{ ip: {w}, node: node-a, weight: 1 }}, {{ ip: {g}, node: node-a, weight: 9 }}]\n"
    );
    let cfg = c.write_file("mesh.yaml", &c.config(&svc)).unwrap();
    let d = c.start_daemon("node-a", &cfg, &[]).unwrap();
    let data = c.write_file("body.bin", &"y".repeat(1 << 20)).unwrap();
    let at = format!("@{}", data.display());
    let url = format!("http://{VIP}/");
    let mut args = vec!["-sS", "--max-time", "60", "--data-binary", &at];
    args.extend(std::iter::repeat_n(url.as_str(), 10));
    let out = c.exec("client", "curl", &args, Duration::from_secs(90)).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), d.log_text());
    assert_eq!(text.lines().filter(|l| *l == "received=1048576").count(), 10, "every 1 MiB body arrived whole: {text}");
    assert_eq!(tally(&text).get("web-1"), Some(&10), "{text}");
    assert!(d.counter("proxy", "retries").unwrap() >= 1, "some went to `gone` first: {}", d.stats().unwrap());
}

#[test]
fn root_meshctl_top_agrees_with_a_known_load() {
    let _one = serial();
    let h = http("http2");
    // One HTTP/2 connection at 200 requests a second for 12 s.
    let rate = 200.0;
    let load =
        h.c.start("client", "h2load", &["-c", "1", "-m", "1", "-n", "2400", "--rps", "200", &format!("http://{VIP}/")])
            .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    // Five seconds in the middle of it, as a script reads them.
    let out = h.c.meshctl("node-a", &["-o", "json", "top", "--interval", "5", "--iterations", "1"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "meshctl top: {text}{}", String::from_utf8_lossy(&out.stderr));
    let load = load.wait_with_output().unwrap();
    let (ok, failed, errored) = h2load_counts(&String::from_utf8_lossy(&load.stdout));
    assert_eq!((ok, failed, errored), (2400, 0, 0), "{}", String::from_utf8_lossy(&load.stdout));
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    let interval = v["intervalSeconds"].as_f64().unwrap();
    assert!((4.9..6.0).contains(&interval), "{v}");
    let web = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["service"].as_str().unwrap().starts_with("default/web") && r["direction"] == "outbound")
        .unwrap_or_else(|| panic!("no row for web: {v}"));
    let rps = web["requestsPerSecond"].as_f64().unwrap();
    eprintln!("meshctl top: {web}");
    assert!((rps - rate).abs() <= rate * 0.1, "top says {rps} requests/s of h2load's {rate}: {v}");
    assert_eq!(web["successRate"].as_f64(), Some(1.0), "{v}");
    let (p50, p99) = (web["p50Ms"].as_f64().unwrap(), web["p99Ms"].as_f64().unwrap());
    assert!(0.0 < p50 && p50 <= p99, "{v}");
    assert!(web["bytesPerSecond"].as_f64().unwrap() > 0.0, "{v}");
}
