//! Metrics, admin endpoints and access logs after known traffic (root,
//! real kernel).

use std::time::Duration;

use mesh_tests::{Cluster, ClusterSpec};

const VIP: &str = "10.96.0.10";
const ECHO_VIP: &str = "10.96.0.11";

/// The value of the sample `name{labels}` whose labels contain every one
/// of `want`.
fn sample(text: &str, name: &str, want: &[&str]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (key, value) = l.rsplit_once(' ')?;
        let (n, labels) = key.split_once('{').unwrap_or((key, ""));
        (n == name && want.iter().all(|w| labels.contains(w))).then(|| value.parse().ok()).flatten()
    })
}

/// The daemon's first access log line (JSON logs), once it is written.
fn first_access_line(d: &mesh_tests::Daemon) -> serde_json::Value {
    let line = || d.log_text().lines().find(|l| l.contains("\"target\":\"access\"")).map(str::to_owned);
    assert!(mesh_tests::sys::wait_until(Duration::from_secs(5), || line().is_some()), "{}", d.log_text());
    serde_json::from_str(&line().unwrap()).unwrap()
}

#[test]
fn root_metrics_count_exactly_what_was_sent_and_pass_promtool() {
    let c = Cluster::create(&ClusterSpec::new().node("node-a").pod("client", "node-a").pod("web-1", "node-a")).unwrap();
    c.serve("web-1", 8080, Some(9000)).unwrap();
    let w1 = c.pod("web-1").ip;
    let svc = format!(
        "  - name: web\n    vip: {VIP}\n    ports: [{{ port: 80, targetPort: 8080 }}]\n    endpoints: [{{ ip: {w1}, node: node-a }}]\n\
         \x20 - name: echo\n    vip: {ECHO_VIP}\n    ports: [{{ port: 9000 }}]\n    endpoints: [{{ ip: {w1}, node: node-a }}]\n"
    );
    let cfg = c.write_file("mesh.yaml", &c.config(&svc)).unwrap();
    let d = c.start_daemon("node-a", &cfg, &[]).unwrap();

    // Known traffic: 7 echo connections of 12345 bytes each way.
    for _ in 0..7 {
        let out = c
            .exec("client", "mt-pod", &["bulk", &format!("{ECHO_VIP}:9000"), "12345"], Duration::from_secs(20))
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    }
    let labels = ["service=\"default/echo:9000\"", &format!("endpoint=\"{w1}:9000\""), "direction=\"outbound\""];
    let metrics = || d.admin_get("/metrics").unwrap().1;
    let closed = mesh_tests::sys::wait_until(Duration::from_secs(5), || {
        sample(&metrics(), "mesh_connections_closed_total", &labels) == Some(7.0)
    });
    assert!(closed, "{}", metrics());
    let m = metrics();
    assert_eq!(sample(&m, "mesh_connections_opened_total", &labels), Some(7.0), "{m}");
    assert_eq!(sample(&m, "mesh_sent_bytes_total", &labels), Some(7.0 * 12345.0), "{m}");
    assert_eq!(sample(&m, "mesh_received_bytes_total", &labels), Some(7.0 * 12345.0), "{m}");
    assert_eq!(
        sample(&m, "mesh_connection_duration_seconds_count", &["service=\"default/echo:9000\""]),
        Some(7.0),
        "{m}"
    );
    assert_eq!(sample(&m, "mesh_kernel_events_total", &["counter=\"redirected\""]), Some(7.0), "{m}");
    assert_eq!(sample(&m, "mesh_state_generation", &[]), Some(1.0), "{m}");
    assert_eq!(sample(&m, "mesh_endpoint_healthy", &["service=\"default/echo\""]), Some(1.0), "{m}");
    assert!(!m.contains("client="), "no per-client labels");
    assert_eq!(sample(&m, "mesh_log_lines_dropped_total", &[]), Some(0.0), "{m}");

    // promtool agrees it is valid exposition format.
    mesh_tests::sys::promtool_check(&m).unwrap().unwrap_or_else(|e| panic!("promtool: {e}"));

    // meshctl stats reads the same metrics over the control socket.
    let out = c.meshctl("node-a", &["stats", "-o", "json"]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let echo = rows.as_array().unwrap().iter().find(|r| r["service"] == "default/echo:9000").expect("echo row");
    assert_eq!(echo["opened"].as_u64(), Some(7), "counts are integers: {rows}");
    assert_eq!(echo["bytesSent"].as_u64(), Some(7 * 12345), "{rows}");
    assert_eq!(echo["bytesReceived"].as_u64(), Some(7 * 12345), "{rows}");
    assert_eq!(echo["direction"], "outbound", "{rows}");
    assert!(echo["ewmaRttMs"].as_f64().is_some(), "{rows}");
    let table = String::from_utf8_lossy(&c.meshctl("node-a", &["stats"]).unwrap().stdout).into_owned();
    assert!(table.contains("EWMA RTT(ms)") && table.contains("default/echo:9000"), "{table}");
    assert!(table.contains(&(7 * 12345).to_string()) && !table.contains(".0 "), "integers print as integers: {table}");

    // The other admin endpoints.
    let (status, dump) = d.admin_get("/config_dump").unwrap();
    assert_eq!(status, 200);
    assert!(dump.contains("\"generation\":1") && dump.contains("default") && dump.contains("echo"), "{dump}");
    assert_eq!(d.admin_get("/live").unwrap().0, 200);
    assert_eq!(d.admin_get("/ready").unwrap().0, 200);
}

#[test]
fn root_access_log_names_identities_endpoint_and_bytes() {
    let c = Cluster::create(&ClusterSpec::new().node("node-a").pod("client", "node-a").pod("web-1", "node-a")).unwrap();
    c.serve("web-1", 8080, Some(9000)).unwrap();
    let w1 = c.pod("web-1").ip;
    let svc = format!("  - name: echo\n    vip: {ECHO_VIP}\n    ports: [{{ port: 9000 }}]\n    endpoints: [{{ ip: {w1}, node: node-a }}]\n");
    let cfg = c.write_file("mesh.yaml", &c.config(&svc)).unwrap();
    let d = c.start_daemon("node-a", &cfg, &["--log-format", "json"]).unwrap();
    let out =
        c.exec("client", "mt-pod", &["bulk", &format!("{ECHO_VIP}:9000"), "4321"], Duration::from_secs(20)).unwrap();
    assert!(out.status.success());
    let v = first_access_line(&d);
    let f = &v["fields"];
    assert_eq!(f["source"], "default/client", "{v}");
    assert_eq!(f["identity"], "spiffe://cluster.local/ns/default/sa/client", "{v}");
    assert_eq!(f["service"], "default/echo:9000", "{v}");
    assert_eq!(f["endpoint"], format!("{w1}:9000"), "{v}");
    assert_eq!(f["node"], "local", "{v}");
    assert_eq!((f["bytes_up"].as_u64(), f["bytes_down"].as_u64()), (Some(4321), Some(4321)), "{v}");
    assert_eq!(f["outcome"], "ok", "{v}");
    assert!(f["duration_ms"].is_u64(), "{v}");
}

#[test]
fn root_cross_node_connections_are_counted_on_both_nodes_with_their_direction() {
    let c = Cluster::create(
        &ClusterSpec::new().node("node-a").node("node-b").pod("client", "node-a").pod("web-2", "node-b"),
    )
    .unwrap();
    c.serve("web-2", 8080, Some(9000)).unwrap();
    let w2 = c.pod("web-2").ip;
    let svc = format!("  - name: echo\n    vip: {ECHO_VIP}\n    ports: [{{ port: 9000 }}]\n    endpoints: [{{ ip: {w2}, node: node-b }}]\n");
    let cfg = c.write_file("mesh.yaml", &c.config(&svc)).unwrap();
    let a = c.start_daemon("node-a", &cfg, &[]).unwrap();
    let b = c.start_daemon("node-b", &cfg, &["--log-format", "json"]).unwrap();
    for _ in 0..5 {
        let out = c
            .exec("client", "mt-pod", &["bulk", &format!("{ECHO_VIP}:9000"), "23456"], Duration::from_secs(20))
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    }
    let series = |d: &mesh_tests::Daemon, direction: &str| {
        let m = d.admin_get("/metrics").unwrap().1;
        let labels = ["service=\"default/echo:9000\"", &format!("endpoint=\"{w2}:9000\""), direction];
        let get = |name| sample(&m, name, &labels);
        (
            get("mesh_connections_closed_total"),
            get("mesh_connections_opened_total"),
            get("mesh_sent_bytes_total"),
            get("mesh_received_bytes_total"),
        )
    };
    let want = (Some(5.0), Some(5.0), Some(5.0 * 23456.0), Some(5.0 * 23456.0));
    for (d, direction) in [(&a, "direction=\"outbound\""), (&b, "direction=\"inbound\"")] {
        let ok = mesh_tests::sys::wait_until(Duration::from_secs(5), || series(d, direction) == want);
        assert!(ok, "{direction}: {:?}\n{}", series(d, direction), d.admin_get("/metrics").unwrap().1);
    }
    // node-b logs each stream it received, with the client's identity.
    let v = first_access_line(&b);
    let f = &v["fields"];
    assert_eq!(f["direction"], "inbound", "{v}");
    assert_eq!(f["identity"], "spiffe://cluster.local/ns/default/sa/client", "{v}");
    assert_eq!(f["service"], "default/echo:9000", "{v}");
    assert_eq!(f["endpoint"], format!("{w2}:9000"), "{v}");
    assert_eq!((f["bytes_up"].as_u64(), f["bytes_down"].as_u64()), (Some(23456), Some(23456)), "{v}");
    assert_eq!(f["outcome"], "ok", "{v}");
}

/// Each service's `accessLog` on request and TCP ports alike: every line
/// (the default), none (`off`, failures included), or every failure and a
/// share of the rest (`10%`).
#[test]
fn root_the_access_log_writes_what_each_service_asks() {
    let c = Cluster::create(&ClusterSpec::new().node("node-a").pod("client", "node-a").pod("web-1", "node-a")).unwrap();
    c.serve_http("web-1", 8080, &[]).unwrap();
    c.serve("web-1", 8081, Some(9000)).unwrap();
    let w1 = c.pod("web-1").ip;
    let svc = |name: &str, vip: &str, log: &str| {
        format!(
            "  - name: {name}\n    vip: {vip}\n    ports: [{{ port: 80, targetPort: 8080, appProtocol: http }}, {{ port: 9000 }}]\n    \
             healthCheck: {{ protocol: none }}\n    endpoints: [{{ ip: {w1}, node: node-a }}]\n{log}"
        )
    };
    let services = [
        ("all", "10.96.0.20", ""),
        ("off", "10.96.0.21", "    accessLog: 'off'\n"),
        ("some", "10.96.0.22", "    accessLog: '10%'\n"),
    ];
    let docs: String = services.iter().map(|(n, v, l)| svc(n, v, l)).collect();
    let cfg = c.write_file("mesh.yaml", &c.config(&docs)).unwrap();
    let d = c.start_daemon("node-a", &cfg, &["--log-format", "json"]).unwrap();

    const OK: usize = 200;
    const MISSING: usize = 20;
    const CONNS: usize = 5;
    for (_, vip, _) in services {
        let (ok, missing) = (format!("http://{vip}/"), format!("http://{vip}/status/404"));
        let mut args = vec!["-sS", "-o", "/dev/null", "--max-time", "60"];
        args.extend(std::iter::repeat_n(ok.as_str(), OK));
        args.extend(std::iter::repeat_n(missing.as_str(), MISSING));
        let out = c.exec("client", "curl", &args, Duration::from_secs(90)).unwrap();
        assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
        for _ in 0..CONNS {
            let out =
                c.exec("client", "mt-pod", &["bulk", &format!("{vip}:9000"), "100"], Duration::from_secs(20)).unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
    }
    // (requests with status 200, with 404, connections) logged for `name`.
    let logged = |name: &str| {
        let lines: Vec<serde_json::Value> = d
            .log_text()
            .lines()
            .filter(|l| l.contains("\"target\":\"access\""))
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let service = |v: &serde_json::Value, port: u16| v["fields"]["service"] == format!("default/{name}:{port}");
        let status = |s: u64| lines.iter().filter(|v| service(v, 80) && v["fields"]["status"] == s).count();
        (status(200), status(404), lines.iter().filter(|v| service(v, 9000)).count())
    };
    let all = mesh_tests::sys::wait_until(Duration::from_secs(5), || logged("all") == (OK, MISSING, CONNS));
    assert!(all, "every line of the default service: {:?}\n{}", logged("all"), d.log_text());
    assert_eq!(logged("off"), (0, 0, 0), "nothing of accessLog: off");
    let (ok, missing, conns) = logged("some");
    assert_eq!(missing, MISSING, "every failure of a sampled service");
    // 10% of 200: 20 expected, 4.2 standard deviations of it either way.
    assert!((3..=38).contains(&ok), "about a tenth of the successful requests: {ok} of {OK}");
    assert!(conns <= CONNS);
}
