//! Hitless restarts and upgrades (root, real kernel): a new daemon takes
//! the listening sockets from the running one, which drains.

use std::time::Duration;

use mesh_tests::sys::{cgroup_programs, wait_until};
use mesh_tests::{Cluster, ClusterSpec, Daemon};

const LOCAL_VIP: &str = "10.96.0.10";
const REMOTE_VIP: &str = "10.96.0.11";
const BULK_LOCAL_VIP: &str = "10.96.0.12";
const BULK_REMOTE_VIP: &str = "10.96.0.13";
const MIB20: &str = "20971520";

/// client and web-1 on node-a, web-2 on node-b; every service in proxy
/// mode, the `remote` ones with their only endpoint across the tunnel.
fn cluster() -> (Cluster, std::path::PathBuf) {
    let c = Cluster::create(&ClusterSpec::client_and_two_webs()).expect("mini cluster");
    for pod in ["web-1", "web-2"] {
        c.serve_with(pod, 8080, None, &["--echo-now", "9100"]).unwrap();
        let p = c.pod(pod).clone();
        assert!(mesh_tests::sys::wait_until(Duration::from_secs(5), || mesh_tests::sys::can_connect(
            &p.netns,
            p.addr(9100)
        )));
    }
    let (w1, w2) = (c.pod("web-1").ip, c.pod("web-2").ip);
    let svc = |name: &str, vip: &str, port: &str, ip, node: &str| {
        format!(
            "  - name: {name}\n    vip: {vip}\n    ports: [{port}]\n    endpoints: [{{ ip: {ip}, node: {node} }}]\n"
        )
    };
    let services = [
        svc("local", LOCAL_VIP, "{ port: 80, targetPort: 8080 }", w1, "node-a"),
        svc("remote", REMOTE_VIP, "{ port: 80, targetPort: 8080 }", w2, "node-b"),
        svc("bulk-local", BULK_LOCAL_VIP, "{ port: 9100 }", w1, "node-a"),
        svc("bulk-remote", BULK_REMOTE_VIP, "{ port: 9100 }", w2, "node-b"),
    ]
    .concat();
    let cfg = c.write_file("mesh.yaml", &c.config(&services)).unwrap();
    (c, cfg)
}

fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.split_whitespace().find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('='))).unwrap_or("")
}

/// Every daemon log, for failure messages.
fn logs(ds: &[&Daemon]) -> String {
    ds.iter().map(|d| format!("--- {}\n{}", d.log.display(), d.log_text())).collect()
}

/// One node's programs are attached once: five, whatever the daemons.
fn assert_attached_once(c: &Cluster, node: &str) {
    let progs = cgroup_programs(&c.node(node).cgroup).unwrap();
    assert_eq!(progs.len(), 5, "{node}: {progs:?}");
}

#[test]
fn root_a_new_daemon_takes_over_while_traffic_flows_and_nothing_fails() {
    let (c, cfg) = cluster();
    let variant = c.bins.daemon_variant.clone();
    assert!(variant.exists(), "{}: another build of the daemon; cargo xtask test builds it", variant.display());
    let ready = |n: &str| c.dir.join(format!("ready-{n}"));
    let (r1, r2) = (ready("a1"), ready("a2"));
    let a1 = c.start_daemon("node-a", &cfg, &["--drain-timeout", "60s", "--ready-file", r1.to_str().unwrap()]).unwrap();
    assert!(wait_until(Duration::from_secs(5), || r1.exists()), "a serving daemon writes its --ready-file");
    let b1 = c.start_daemon("node-b", &cfg, &["--drain-timeout", "60s"]).unwrap();

    // Two 20 MiB transfers of about 8 s each (echoed back as they go), one
    // to a local endpoint and one through the tunnel, and new
    // connections at about 50/s to both kinds of service.
    let bulk_local = c.start("client", "mt-pod", &["bulk", &format!("{BULK_LOCAL_VIP}:9100"), MIB20, "8"]).unwrap();
    let bulk_remote = c.start("client", "mt-pod", &["bulk", &format!("{BULK_REMOTE_VIP}:9100"), MIB20, "8"]).unwrap();
    let load_local = c.start("client", "mt-pod", &["load", &format!("{LOCAL_VIP}:80"), "400", "1", "20"]).unwrap();
    let load_remote = c.start("client", "mt-pod", &["load", &format!("{REMOTE_VIP}:80"), "400", "1", "20"]).unwrap();
    a1.wait_counter("proxy", "forwarded", 10, Duration::from_secs(5), "traffic did not start");
    std::thread::sleep(Duration::from_secs(1));

    // node-a: a restart of the same build; node-b: an upgrade to another.
    let mut a0 = a1;
    let a2 = c
        .start_successor("node-a", &cfg, &["--drain-timeout", "60s", "--ready-file", r2.to_str().unwrap()], None)
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || r2.exists() && !r1.exists()),
        "the readiness probe now passes for the new daemon only"
    );
    a0.signal(libc::SIGTERM).unwrap();
    assert_attached_once(&c, "node-a");
    let mut b0 = b1;
    let b2 = c.start_successor("node-b", &cfg, &["--drain-timeout", "60s"], Some(&variant)).unwrap();
    b0.signal(libc::SIGTERM).unwrap();
    assert_attached_once(&c, "node-b");

    let all = || logs(&[&a0, &a2, &b0, &b2]);
    for (name, child) in [("local", bulk_local), ("through the tunnel", bulk_remote)] {
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "the {name} transfer failed: {text}\n{}", all());
        assert_eq!(field(&text, "recv"), MIB20, "{name}: {text}");
        assert_eq!(field(&text, "sent_sum"), field(&text, "recv_sum"), "{name}: {text}");
    }
    for (name, child) in [("local", load_local), ("through the tunnel", load_remote)] {
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let fails: Vec<&str> = text.lines().filter(|l| l.contains("FAIL")).collect();
        assert!(text.contains("ok=400 failed=0"), "new {name} connections failed: {fails:?}\n{}", all());
    }

    // The old daemons drained and exited, leaving the datapath and the
    // sockets to the new ones.
    for (old, who) in [(&mut a0, "node-a"), (&mut b0, "node-b")] {
        let status = old.wait_exit(Duration::from_secs(30)).unwrap();
        assert!(status.success(), "{who}: old daemon exit {status}");
        let log = old.log_text();
        assert!(log.contains("handed over: draining") && log.contains("drained"), "{who}: {log}");
        assert!(log.contains("the drain goes on"), "the pod's SIGTERM after the handover cut the drain: {log}");
    }
    assert_attached_once(&c, "node-a");
    assert_attached_once(&c, "node-b");
    let b2_log = b2.log_text();
    assert!(b2_log.contains("taking over from the running daemon"), "{b2_log}");
    let builds = |log: &str| (field(log, "from_build").to_owned(), field(log, "build").to_owned());
    let line = b2_log.lines().find(|l| l.contains("taking over from the running daemon")).unwrap();
    let (from, to) = builds(line);
    assert_ne!(from, to, "node-b's successor is another build: {line}");
    let line = a2.log_text();
    let line = line.lines().find(|l| l.contains("taking over from the running daemon")).unwrap().to_owned();
    let (from, to) = builds(&line);
    assert_eq!(from, to, "node-a's successor is the same build: {line}");

    // The new daemons serve everything, the control API included.
    for vip in [LOCAL_VIP, REMOTE_VIP] {
        let (code, body) = c.curl("client", &format!("http://{vip}/")).unwrap();
        assert_eq!(code, 0, "{vip}: {body}\n{}", logs(&[&a2, &b2]));
    }
    let out = c.meshctl("node-a", &["status"]).unwrap();
    assert!(out.status.success(), "meshctl after the handover: {}", String::from_utf8_lossy(&out.stderr));
    drop((a2, b2));
}

#[test]
fn root_a_successor_that_fails_to_start_leaves_the_running_daemon_serving() {
    let (c, cfg) = cluster();
    let a1 = c.start_daemon("node-a", &cfg, &[]).unwrap();
    // A successor that asks for the listeners, then fails before it is
    // ready (its --api-group does not exist).
    let r = c.start_successor("node-a", &cfg, &["--api-group", "mesh-test-no-such-group"], None);
    assert!(r.is_err(), "the successor should fail to start");
    let log = a1.log_with("took the datapath back", 1);
    assert!(log.contains("did not become ready") && log.contains("took the datapath back"), "{log}");
    // Still serving, and still taking writes.
    let (code, body) = c.curl("client", &format!("http://{LOCAL_VIP}/")).unwrap();
    assert_eq!(code, 0, "{body}\n{log}");
    let out = c.meshctl("node-a", &["set-weight", "local", &c.pod("web-1").ip.to_string(), "3"]).unwrap();
    assert!(out.status.success(), "a write after the failed handover: {}", String::from_utf8_lossy(&out.stderr));
    assert_attached_once(&c, "node-a");
}

#[test]
fn root_while_no_daemon_runs_proxy_mode_connections_are_refused_at_once() {
    let (c, cfg) = cluster();
    let mut a = c.start_daemon("node-a", &cfg, &[]).unwrap();
    a.kill9();
    // The programs still redirect to the proxy's port, where nothing
    // listens: the client's connect is refused (curl exit 7), not left
    // waiting (28 would be its timeout).
    let t0 = std::time::Instant::now();
    let (code, body) = c.curl("client", &format!("http://{LOCAL_VIP}/")).unwrap();
    let took = t0.elapsed();
    assert_eq!(code, 7, "{body}");
    eprintln!("proxy-mode connect with no daemon: refused after {took:?} (curl included)");
    let a2 = c.start_daemon("node-a", &cfg, &[]).unwrap();
    let (code, body) = c.curl("client", &format!("http://{LOCAL_VIP}/")).unwrap();
    assert_eq!(code, 0, "{body}\n{}", a2.log_text());
}

/// The directories of pinned links under `node`'s pin dir (`links-<object id>`).
fn links_dirs(c: &Cluster, node: &str) -> Vec<std::path::PathBuf> {
    let mut dirs: Vec<_> = std::fs::read_dir(&c.node(node).pin_dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("links-")))
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn root_a_successor_with_other_kernel_programs_replaces_them_while_traffic_flows() {
    let (c, cfg) = cluster();
    let mut a1 = c.start_daemon("node-a", &cfg, &["--drain-timeout", "60s"]).unwrap();
    let old_progs = cgroup_programs(&c.node("node-a").cgroup).unwrap();
    assert_eq!(old_progs.len(), 5, "{old_progs:?}");
    // What a build with another kernel object leaves: its links pinned in
    // a directory named for that object. (Both daemon builds the test has
    // carry the same object, so the running one's is renamed.)
    let dirs = links_dirs(&c, "node-a");
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let other = c.node("node-a").pin_dir.join("links-0000000000000000");
    std::fs::rename(&dirs[0], &other).unwrap();

    // New connections at about 50/s, to a local and a remote service,
    // while the successor attaches its programs and drops the old ones.
    let _b = c.start_daemon("node-b", &cfg, &[]).unwrap();
    let load_local = c.start("client", "mt-pod", &["load", &format!("{LOCAL_VIP}:80"), "400", "1", "20"]).unwrap();
    let load_remote = c.start("client", "mt-pod", &["load", &format!("{REMOTE_VIP}:80"), "400", "1", "20"]).unwrap();
    a1.wait_counter("proxy", "forwarded", 10, Duration::from_secs(5), "traffic did not start");
    std::thread::sleep(Duration::from_secs(1));
    let a2 = c.start_successor("node-a", &cfg, &["--drain-timeout", "60s"], None).unwrap();
    a1.signal(libc::SIGTERM).unwrap();

    for (name, child) in [("local", load_local), ("through the tunnel", load_remote)] {
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let fails: Vec<&str> = text.lines().filter(|l| l.contains("FAIL")).collect();
        assert!(text.contains("ok=400 failed=0"), "new {name} connections failed: {fails:?}\n{}", logs(&[&a1, &a2]));
    }
    let status = a1.wait_exit(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "old daemon exit {status}");
    // Five programs, all new; the other object's links are gone.
    let new_progs = cgroup_programs(&c.node("node-a").cgroup).unwrap();
    assert_eq!(new_progs.len(), 5, "{new_progs:?}");
    assert!(new_progs.iter().all(|p| !old_progs.contains(p)), "old {old_progs:?}, now {new_progs:?}");
    let dirs = links_dirs(&c, "node-a");
    assert!(dirs.len() == 1 && dirs[0] != other, "{dirs:?}");
    assert_eq!(std::fs::read_dir(&dirs[0]).unwrap().count(), 5, "{}", dirs[0].display());
    let log = a2.log_text();
    assert!(log.contains("datapath attached") && !log.contains("reusing the attached programs"), "{log}");
    let (code, body) = c.curl("client", &format!("http://{LOCAL_VIP}/")).unwrap();
    assert_eq!(code, 0, "{body}\n{}", logs(&[&a1, &a2]));
}

/// What a daemon before IPv6 pinned: maps whose keys held 4-byte
/// addresses. This build's programs cannot use them; the daemon unpins
/// them, makes them anew and serves.
#[test]
fn root_maps_pinned_with_the_ipv4_only_layout_are_made_anew() {
    let (c, cfg) = cluster();
    let pin_dir = c.node("node-a").pin_dir.clone();
    std::fs::create_dir_all(&pin_dir).unwrap();
    for (name, key, value) in [("SERVICES", "8", "16"), ("SLOTS", "12", "8"), ("ORIG_DST", "8", "16")] {
        let path = pin_dir.join(name);
        let args = ["map", "create", path.to_str().unwrap(), "type", "hash", "key", key, "value", value];
        mesh_tests::sys::bpftool(&[&args[..], &["entries", "16", "name", name, "flags", "1"]].concat()).unwrap();
    }
    let a = c.start_daemon("node-a", &cfg, &[]).unwrap();
    let log = a.log_text();
    for name in ["SERVICES", "SLOTS", "ORIG_DST"] {
        assert!(log.contains(&format!("made anew map=\"{name}\"")), "{name}: {log}");
    }
    let services = pin_dir.join("SERVICES");
    let info = mesh_tests::sys::bpftool(&["map", "show", "pinned", services.to_str().unwrap()]).unwrap();
    assert_eq!(info["bytes_key"], 20, "{info}");
    let (code, body) = c.curl("client", &format!("http://{LOCAL_VIP}/")).unwrap();
    assert_eq!(code, 0, "{body}\n{log}");
}
