//! Trace context and OTLP spans (root, real kernel): a request that arrives
//! with a sampled W3C context is traced through both nodes' proxies, each
//! exporting its span to a real OTLP receiver (mt-otlp, decoding with
//! opentelemetry-proto), node-a over HTTP/protobuf and node-b over gRPC.

use std::time::Duration;

use mesh_tests::{Cluster, ClusterSpec};

const VIP: &str = "10.96.0.50";
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER: &str = "00f067aa0ba902b7";

fn spans(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

fn metric(d: &mesh_tests::Daemon, name: &str) -> u64 {
    d.metric(name, &[])
}

#[test]
fn root_a_sampled_request_is_traced_through_both_proxies_and_its_spans_exported_over_otlp() {
    let c = Cluster::create(
        &ClusterSpec::new().node("node-a").node("node-b").pod("client", "node-a").pod("web-1", "node-b"),
    )
    .expect("mini cluster");
    c.serve_http("web-1", 8080, &[]).unwrap();
    let node_a = c.node("node-a").address;
    let out = c.dir.join("spans.jsonl");
    let receiver = c
        .spawn_on_node("node-a", &c.bins.mt_otlp.to_string_lossy(), &["--port", "4318", "--out", out.to_str().unwrap()])
        .unwrap();
    let netns = c.node("node-a").netns.clone();
    let listening = std::net::SocketAddr::from((node_a, 4318));
    assert!(mesh_tests::sys::wait_until(Duration::from_secs(10), || mesh_tests::sys::can_connect(&netns, listening)));
    let svc = format!(
        "  - name: web\n    vip: {VIP}\n    ports: [{{ port: 80, targetPort: 8080, appProtocol: http }}]\n    healthCheck: {{ protocol: none }}\n    \
         endpoints: [{{ ip: {}, node: node-b }}]\n",
        c.pod("web-1").ip
    );
    let cfg = c.write_file("mesh.yaml", &c.config(&svc)).unwrap();
    let collector = format!("http://{node_a}:4318");
    let a = c.start_daemon("node-a", &cfg, &["--otlp-endpoint", &collector, "--log-format", "json"]).unwrap();
    let b = c.start_daemon("node-b", &cfg, &["--otlp-endpoint", &collector, "--otlp-protocol", "grpc"]).unwrap();
    let curl = |headers: &[&str], n: usize| -> String {
        let url = format!("http://{VIP}/");
        let mut args = vec!["-sS", "--max-time", "10"];
        for h in headers {
            args.extend(["-H", h]);
        }
        args.extend(std::iter::repeat_n(url.as_str(), n));
        let out = c.exec("client", "curl", &args, Duration::from_secs(30)).unwrap();
        assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    // A sampled request: the trace id is kept, the parent is not the caller's.
    let sampled = format!("traceparent: 00-{TRACE}-{CALLER}-01");
    let body = curl(&[&sampled, "tracestate: congo=t61rcWkgMzE"], 1);
    let seen = body.lines().find_map(|l| l.strip_prefix("traceparent=")).expect("the backend got a traceparent");
    let parts: Vec<&str> = seen.split('-').collect();
    assert_eq!((parts[0], parts[1], parts[3]), ("00", TRACE, "01"), "{seen}");
    assert_ne!(parts[2], CALLER, "the proxies' span is the backend's parent");

    // Both spans arrive: node-a's client span, child of the caller; node-b's
    // server span, child of node-a's; the backend's parent is node-b's span.
    assert!(
        mesh_tests::sys::wait_until(Duration::from_secs(10), || spans(&out).len() >= 2),
        "spans: {:?}\n{}\n{}",
        spans(&out),
        a.log_text(),
        b.log_text()
    );
    let all = spans(&out);
    assert_eq!(all.len(), 2, "{all:?}");
    let of =
        |node: &str| all.iter().find(|s| s["node"] == node).unwrap_or_else(|| panic!("no span of {node}: {all:?}"));
    let (client, server) = (of("node-a"), of("node-b"));
    assert!(all.iter().all(|s| s["trace_id"] == TRACE), "{all:?}");
    assert_eq!((client["kind"].as_i64(), server["kind"].as_i64()), (Some(3), Some(2)), "CLIENT, then SERVER");
    assert_eq!(client["parent_span_id"], CALLER);
    assert_eq!(server["parent_span_id"], client["span_id"]);
    assert_eq!(server["span_id"], parts[2]);
    let endpoint = format!("{}:8080", c.pod("web-1").ip);
    for s in [client, server] {
        assert_eq!(s["attributes"]["mesh.service"], "default/web:80", "{s}");
        assert_eq!(s["attributes"]["mesh.endpoint"], endpoint.as_str(), "{s}");
        assert_eq!(s["attributes"]["http.response.status_code"], 200, "{s}");
        assert_eq!(s["status"], 0, "not an error: {s}");
    }
    // node-a's access log carries the trace id.
    assert!(a.log_text().lines().any(|l| l.contains("\"trace_id\":\"4bf92f3577b34da6a3ce929d0e0e4736\"")));

    // No trace headers: none added, no span. Not sampled: passed on as is.
    let body = curl(&[], 3);
    assert!(!body.contains("traceparent="), "{body}");
    let unsampled = format!("traceparent: 00-{TRACE}-{CALLER}-00");
    let body = curl(&[&unsampled], 1);
    assert!(body.contains(&format!("traceparent=00-{TRACE}-{CALLER}-00")), "{body}");
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(spans(&out).len(), 2, "no span for untraced or unsampled requests: {:?}", spans(&out));
    assert!(metric(&a, "mesh_spans_exported_total") >= 1 && metric(&b, "mesh_spans_exported_total") >= 1);

    // The collector goes away: requests keep being answered, spans are
    // dropped and counted.
    c.kill(receiver);
    let body = curl(&[&sampled], 20);
    assert_eq!(body.lines().filter(|l| l.starts_with("backend=web-1")).count(), 20, "{body}");
    assert!(
        mesh_tests::sys::wait_until(Duration::from_secs(15), || metric(&a, "mesh_spans_dropped_total") >= 20),
        "dropped: {}",
        metric(&a, "mesh_spans_dropped_total")
    );
}
