//! gRPC through the mesh (root, real kernel): a real gRPC client and
//! server (tonic) on two nodes; unary and server-streaming calls on one
//! channel travel through the mTLS tunnel and are balanced per call.

use std::time::Duration;

use mesh_tests::{Cluster, ClusterSpec};

const VIP: &str = "10.96.0.12";

#[test]
fn root_grpc_calls_of_one_channel_are_balanced_across_nodes_through_the_tunnel() {
    let c = Cluster::create(
        &ClusterSpec::new()
            .node("node-a")
            .node("node-b")
            .pod("client", "node-a")
            .pod("g-1", "node-b")
            .pod("g-2", "node-b"),
    )
    .expect("mini cluster");
    for g in ["g-1", "g-2"] {
        c.spawn(g, &c.bins.mt_grpc.clone(), &["serve", "--name", g, "--port", "50051"]).unwrap();
        let p = c.pod(g).clone();
        assert!(mesh_tests::sys::wait_until(Duration::from_secs(10), || mesh_tests::sys::can_connect(
            &p.netns,
            p.addr(50051)
        )));
    }
    let svc = format!(
        "  - name: echo\n    vip: {VIP}\n    ports: [{{ port: 50051, appProtocol: grpc }}]\n    healthCheck: {{ protocol: none }}\n    \
         endpoints: [{{ ip: {}, node: node-b }}, {{ ip: {}, node: node-b }}]\n",
        c.pod("g-1").ip,
        c.pod("g-2").ip
    );
    let cfg = c.write_file("mesh.yaml", &c.config(&svc)).unwrap();
    let a = c.start_daemon("node-a", &cfg, &[]).unwrap();
    let b = c.start_daemon("node-b", &cfg, &[]).unwrap();

    let out =
        c.exec("client", "mt-grpc", &["call", &format!("http://{VIP}:50051"), "200"], Duration::from_secs(60)).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{}\n{}", String::from_utf8_lossy(&out.stderr), a.log_text());
    assert!(text.contains("failed=0"), "{text}\n{}\n{}", a.log_text(), b.log_text());
    let by = |g: &str| text.lines().filter(|l| *l == format!("unary backend={g}")).count();
    eprintln!("200 unary calls on one channel: g-1 {}, g-2 {}", by("g-1"), by("g-2"));
    assert_eq!(by("g-1") + by("g-2"), 200, "{text}");
    assert!(by("g-1") >= 60 && by("g-2") >= 60, "one channel, yet both answer about half: {text}");
    assert!(text.contains("seqs=1,2,3,4,5"), "the server stream arrived whole: {text}");

    assert_eq!(a.counter("proxy", "accepted").unwrap(), 1, "one client connection");
    let (_, m) = a.admin_get("/metrics").unwrap();
    let ok = mesh_tests::sys::metric_sum(&m, "mesh_requests_total", &["class=\"OK\""]);
    assert_eq!(ok, 201, "200 unary calls and one stream, by their gRPC status: {m}");
    // The receiving node proxied and counted each call too.
    let inbound_ok = || b.metric("mesh_requests_total", &["class=\"OK\"", "direction=\"inbound\""]);
    assert!(mesh_tests::sys::wait_until(Duration::from_secs(5), || inbound_ok() == 201), "{}", inbound_ok());
    // Pooled: one upstream HTTP/2 connection (one tunnel stream) per
    // endpoint, not one per call, over one tunnel connection.
    let streams = b.counter("tunnel", "streams").unwrap();
    assert!(streams <= 2, "{streams} tunnel streams for 201 calls");
    assert_eq!(b.counter("tunnel", "handshakes").unwrap(), 1);
}

#[test]
fn root_a_grpc_call_no_endpoint_takes_ends_unavailable_not_reset() {
    let c = Cluster::create(&ClusterSpec::new().node("node-a").pod("client", "node-a").pod("g-1", "node-a"))
        .expect("mini cluster");
    // Nothing listens on g-1:50051.
    let svc = format!(
        "  - name: echo\n    vip: {VIP}\n    ports: [{{ port: 50051, appProtocol: grpc }}]\n    healthCheck: {{ protocol: none }}\n    \
         failOpen: true\n    endpoints: [{{ ip: {}, node: node-a }}]\n",
        c.pod("g-1").ip
    );
    let cfg = c.write_file("mesh.yaml", &c.config(&svc)).unwrap();
    let d = c.start_daemon("node-a", &cfg, &[]).unwrap();
    let out =
        c.exec("client", "mt-grpc", &["call", &format!("http://{VIP}:50051"), "3"], Duration::from_secs(60)).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("unary status=Unavailable"), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.lines().filter(|l| l.starts_with("unary status=Unavailable")).count() == 3, "{text}");
    let (_, m) = d.admin_get("/metrics").unwrap();
    assert!(m.contains("class=\"UNAVAILABLE\"") && m.contains("endpoint=\"\""), "{m}");
}
