//! Limits under abuse (root, real kernel): clients that open many
//! connections and send nothing, or hold tunnel streams idle, hit a limit,
//! and the daemon's descriptors and memory come back afterwards.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use mesh_tests::sys::{fd_count, fd_list, in_netns, rss_kib, wait_until};
use mesh_tests::{Cluster, ClusterSpec, Daemon};

const VIP: &str = "10.96.0.10";
const REMOTE_VIP: &str = "10.96.0.11";
const HALF_REQUEST: &[u8] = b"GET /v1/state HTTP/1.1\r\nHost: x\r\n";

fn cluster() -> (Cluster, std::path::PathBuf) {
    cluster_of(ClusterSpec::client_and_two_webs())
}

/// `spec`'s cluster with web (VIP, web-1 on node-a) and remote (REMOTE_VIP,
/// web-2's echo on node-b, through the tunnel); its config file.
fn cluster_of(spec: ClusterSpec) -> (Cluster, std::path::PathBuf) {
    let c = Cluster::create(&spec).expect("mini cluster");
    c.serve("web-1", 8080, None).unwrap();
    c.serve_with("web-2", 8080, None, &["--echo-now", "9100"]).unwrap();
    let (w1, w2) = (c.pod("web-1").ip, c.pod("web-2").ip);
    let services = format!(
        "  - name: web\n    vip: {VIP}\n    ports: [{{ port: 80, targetPort: 8080 }}]\n    endpoints: [{{ ip: {w1}, node: node-a }}]\n\
         \x20 - name: remote\n    vip: {REMOTE_VIP}\n    ports: [{{ port: 9100 }}]\n    endpoints: [{{ ip: {w2}, node: node-b }}]\n"
    );
    let cfg = c.write_file("mesh.yaml", &c.config(&services)).unwrap();
    (c, cfg)
}

/// Sockets the peer closed: a read sees EOF or an error at once.
fn closed(s: &mut impl Read) -> bool {
    let mut b = [0u8; 256];
    !matches!(s.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut)
}

fn usage(d: &Daemon) -> (usize, u64) {
    (fd_count(d.pid()), rss_kib(d.pid()))
}

/// Waits up to `wait` for `d` (`node`) to hold at most one descriptor more
/// than `fds0`, then checks its RSS is within 8 MiB of `rss0`. `fds1` is
/// the count while the abuse held on, and `was` the open descriptors at
/// the start (both for the messages).
fn assert_back(d: &Daemon, node: &str, wait: Duration, (fds0, rss0): (usize, u64), fds1: usize, was: &str) {
    assert!(
        wait_until(wait, || fd_count(d.pid()) <= fds0 + 1),
        "{node} still holds {} descriptors (from {fds0}): {} (was {was})",
        fd_count(d.pid()),
        fd_list(d.pid())
    );
    let rss2 = rss_kib(d.pid());
    eprintln!("{node} descriptors: {fds0} -> {fds1} -> {}; RSS {rss0} -> {rss2} KiB", fd_count(d.pid()));
    assert!(rss2 <= rss0 + 8 * 1024, "{node}'s RSS did not come back: {rss0} -> {rss2} KiB");
}

#[test]
fn root_half_sent_requests_to_the_api_and_admin_hit_their_caps_and_time_out() {
    let (c, cfg) = cluster();
    // 10 s: the 2500 connections must all be open before the first one's
    // header timeout runs out, and on a loaded machine a few admin connects
    // wait out a dropped SYN (1 s, 2 s) and made opening take 3 s.
    let d = c.start_daemon("node-a", &cfg, &["--client-header-timeout", "10s"]).unwrap();
    // Warm: the first requests allocate what every later one reuses.
    for _ in 0..20 {
        assert!(c.meshctl("node-a", &["status"]).unwrap().status.success());
        d.admin_get("/metrics").unwrap();
    }
    std::thread::sleep(Duration::from_millis(1500));
    let (fds0, rss0) = usage(&d);

    // 2000 API connections and 500 admin ones, each with half a request.
    let t0 = Instant::now();
    let mut api: Vec<UnixStream> = Vec::new();
    for _ in 0..2000 {
        let mut s = UnixStream::connect(c.api_socket("node-a")).unwrap();
        let _ = s.write_all(HALF_REQUEST);
        api.push(s);
    }
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], mesh_tests::cluster::ADMIN_PORT));
    let mut admin: Vec<TcpStream> = in_netns(&d.node.netns, || {
        (0..500)
            .filter_map(|_| {
                let mut s = TcpStream::connect_timeout(&admin_addr, Duration::from_secs(2)).ok()?;
                let _ = s.write_all(HALF_REQUEST);
                Some(s)
            })
            .collect()
    })
    .unwrap();
    let opened = t0.elapsed();
    let (fds1, rss1) = usage(&d);
    for s in &api {
        s.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
    }
    for s in &admin {
        s.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
    }
    let api_refused = api.iter_mut().map(closed).filter(|c| *c).count();
    let admin_refused = admin.iter_mut().map(closed).filter(|c| *c).count();
    eprintln!(
        "opened in {opened:?}; holding: fds {fds0} -> {fds1}, RSS {rss0} -> {rss1} KiB; closed at once: API {api_refused}/2000, admin {admin_refused}/{}",
        admin.len()
    );
    assert!(t0.elapsed() < Duration::from_secs(10), "opening took longer than the header timeout: {opened:?}");
    assert!(api_refused >= 2000 - 128, "the API cap (128) let {} in", 2000 - api_refused);
    assert!(admin_refused >= admin.len() - 64, "the admin cap (64) let {} in", admin.len() - admin_refused);
    assert!(fds1 <= fds0 + 128 + 64 + 16, "descriptors held past the caps: {fds0} -> {fds1}");

    // The header timeout (10 s) closes the rest.
    let start = Instant::now();
    let all_closed = wait_until(Duration::from_secs(13), || api.iter_mut().all(closed) && admin.iter_mut().all(closed));
    assert!(all_closed, "connections with half a request still open after {:?}", start.elapsed());
    drop((api, admin));
    // Descriptors at once, memory once the heap is trimmed (a second after
    // the last connection closed).
    assert!(
        wait_until(Duration::from_secs(5), || fd_count(d.pid()) <= fds0 + 2),
        "fds {fds0} -> {}: {}",
        fd_count(d.pid()),
        fd_list(d.pid())
    );
    std::thread::sleep(Duration::from_millis(2000));
    let (fds2, rss2) = usage(&d);
    eprintln!("after: fds {fds2}, RSS {rss2} KiB (start {rss0}, while held {rss1})");
    assert!(rss2 <= rss0 + 8 * 1024, "RSS did not come back: {rss0} -> {rss1} -> {rss2} KiB");
    // And it still serves both.
    assert!(c.meshctl("node-a", &["status"]).unwrap().status.success());
    assert_eq!(d.admin_get("/ready").unwrap().0, 200);

    // A body that does not arrive, and one too large.
    let ask = |head: &str| {
        let mut s = UnixStream::connect(c.api_socket("node-a")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        s.write_all(head.as_bytes()).unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
    };
    let slow = ask("PUT /v1/state HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{");
    assert!(slow.starts_with("HTTP/1.1 408") && slow.contains("--client-header-timeout"), "{slow}");
    let big = ask("PUT /v1/state HTTP/1.1\r\nHost: x\r\nContent-Length: 17825792\r\nConnection: close\r\n\r\n");
    assert!(big.starts_with("HTTP/1.1 413") && big.contains("larger than 16 MiB"), "{big}");
    assert!(c.meshctl("node-a", &["status"]).unwrap().status.success());
}

#[test]
fn root_idle_tunnel_streams_are_closed_and_a_peer_past_its_stream_cap_is_refused() {
    let (c, cfg) = cluster();
    let a = c.start_daemon("node-a", &cfg, &["--idle-timeout", "3s"]).unwrap();
    let b = c.start_daemon("node-b", &cfg, &["--idle-timeout", "3s", "--tunnel-streams-per-peer", "5"]).unwrap();
    // The baseline holds the tunnel connection from node-a: one stream
    // through it first, and a moment for its backend connection to close.
    let out =
        c.exec("client", "mt-pod", &["bulk", &format!("{REMOTE_VIP}:9100"), "1000"], Duration::from_secs(10)).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    std::thread::sleep(Duration::from_millis(500));
    let (b_fds0, b_rss0) = usage(&b);
    let b_open0 = fd_list(b.pid());
    // Ten connections through the tunnel that send nothing, held 10 s.
    let hold = c.start("client", "mt-pod", &["hold", &format!("{REMOTE_VIP}:9100"), "10", "10"]).unwrap();
    let why = "the sixth to tenth streams of one peer should be refused";
    assert_eq!(b.wait_counter("tunnel", "over_peer_limit", 5, Duration::from_secs(5), why), 5);
    let (b_fds1, _) = usage(&b);
    assert!(b_fds1 >= b_fds0 + 5, "five streams and their backend connections: fds {b_fds0} -> {b_fds1}");
    // Nothing moves: after the idle timeout (3 s) the streams and the
    // backend connections are closed, though the client still holds on.
    assert_back(&b, "node-b", Duration::from_secs(6), (b_fds0, b_rss0), b_fds1, &b_open0);
    let idle = a.log_with("outcome=idle", 5);
    assert!(idle.matches("outcome=idle").count() >= 5, "node-a's access log shows the idle closes: {idle}");
    let _ = hold.wait_with_output();
    // Below the cap again, the peer gets streams.
    let out = c
        .exec("client", "mt-pod", &["bulk", &format!("{REMOTE_VIP}:9100"), "100000"], Duration::from_secs(10))
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn root_a_peer_past_its_tunnel_connection_cap_is_closed_and_other_peers_are_not() {
    let (c, cfg) = cluster_of(ClusterSpec::client_and_two_webs().plain_pod("evil", "node-a"));
    let _a = c.start_daemon("node-a", &cfg, &[]).unwrap();
    let b = c.start_daemon("node-b", &cfg, &["--tunnel-connections-per-peer", "3"]).unwrap();
    let bulk = |bytes: &str| {
        let out = c
            .exec("client", "mt-pod", &["bulk", &format!("{REMOTE_VIP}:9100"), bytes], Duration::from_secs(10))
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    };
    // The baseline holds node-a's tunnel connection (see above).
    bulk("1000");
    std::thread::sleep(Duration::from_millis(500));
    let (fds0, rss0) = usage(&b);
    let open0 = fd_list(b.pid());
    // One identity of the trust domain (sa/evil) opens 8 connections to
    // node-b's tunnel port and holds them 4 s.
    let evil = c.issue_cert(&c.ca_dir().unwrap(), "spiffe://cluster.local/ns/default/sa/evil", 3600, "evil").unwrap();
    let tunnel = format!("{}:15008", c.node("node-b").address);
    let hold = c.start("evil", "mt-tunnel", &["hold", &tunnel, evil.to_str().unwrap(), "8", "4"]).unwrap();
    let why = "the fourth to eighth connections of one peer should be closed";
    assert_eq!(b.wait_counter("tunnel", "over_peer_limit", 5, Duration::from_secs(4), why), 5);
    let (fds1, _) = usage(&b);
    assert!(fds1 >= fds0 + 3, "three connections held: fds {fds0} -> {fds1}");
    // Another peer (node-a) is not held up by it: its streams go through.
    bulk("100000");
    let out = hold.wait_with_output().unwrap();
    let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(line, "held=3 closed=5", "{}", String::from_utf8_lossy(&out.stderr));
    assert!(b.log_text().contains("at their limit (--tunnel-connections-per-peer)"), "{}", b.log_text());
    // Once they close, node-b's descriptors and memory come back, and the
    // same peer gets connections again.
    assert_back(&b, "node-b", Duration::from_secs(5), (fds0, rss0), fds1, &open0);
    let again =
        c.exec("evil", "mt-tunnel", &["hold", &tunnel, evil.to_str().unwrap(), "3", "1"], Duration::from_secs(20));
    let again = again.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&again.stdout).trim(),
        "held=3 closed=0",
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(b.counter("tunnel", "over_peer_limit").unwrap(), 5);
}

#[test]
fn root_an_http2_client_connection_that_moves_nothing_is_closed_after_the_idle_timeout() {
    let c = Cluster::create(&ClusterSpec::client_and_two_webs()).expect("mini cluster");
    c.serve_http("web-1", 8080, &[]).unwrap();
    let w1 = c.pod("web-1").ip;
    let svc = format!(
        "  - name: web\n    vip: {VIP}\n    ports: [{{ port: 80, targetPort: 8080, appProtocol: http2 }}]\n    \
         healthCheck: {{ protocol: none }}\n    endpoints: [{{ ip: {w1}, node: node-a }}]\n"
    );
    let cfg = c.write_file("mesh.yaml", &c.config(&svc)).unwrap();
    let d = c.start_daemon("node-a", &cfg, &["--idle-timeout", "2s"]).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let (fds0, rss0) = usage(&d);
    let open0 = fd_list(d.pid());
    // Two HTTP/2 connections that make no request: one sends nothing after
    // its SETTINGS, the other a PING every 500 ms.
    let target = format!("{VIP}:80");
    let quiet = c.start("client", "mt-pod", &["h2idle", &target, "0", "10"]).unwrap();
    let busy = c.start("client", "mt-pod", &["h2idle", &target, "500", "5"]).unwrap();
    let why = "both connections reach the proxy";
    assert_eq!(d.wait_counter("proxy", "accepted", 2, Duration::from_secs(3), why), 2);
    let fds1 = fd_count(d.pid());
    let out = |child: std::process::Child| {
        let o = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    };
    // The quiet one gets a GOAWAY and is closed after the idle timeout (2 s).
    let quiet = out(quiet);
    let ms: u64 = quiet
        .strip_prefix("closed_after_ms=")
        .and_then(|r| r.strip_suffix(" goaway=yes"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the quiet connection: {quiet}\n{}", d.log_text()));
    assert!((1900..6000).contains(&ms), "closed after {ms} ms, not about the idle timeout (2 s)");
    // The one that moves bytes is not, though it makes no request either.
    let busy = out(busy);
    assert!(busy.starts_with("open_after_ms="), "the pinging connection was closed: {busy}");
    assert_eq!(d.counter("proxy", "idle_closed").unwrap(), 1, "{}", d.stats().unwrap());
    eprintln!("quiet: {quiet}; pinging: {busy}");
    assert_back(&d, "node-a", Duration::from_secs(5), (fds0, rss0), fds1, &open0);
}
