//! End-to-end tests of the control plane on the real kernel (root): the
//! Unix-socket API through meshctl, live map sync, in-kernel weighted
//! balancing, restart survival, persistence and access control.

use std::collections::BTreeMap;
use std::process::Output;
use std::time::Duration;

use mesh_tests::sys::cgroup_programs;
use mesh_tests::{Cluster, ClusterSpec, Daemon};

const VIP: &str = "10.96.0.10";

/// One node: client, web-1, web-2 (HTTP on 8080).
fn cluster() -> Cluster {
    let c = Cluster::create(
        &ClusterSpec::new().node("node-a").pod("client", "node-a").pod("web-1", "node-a").pod("web-2", "node-a"),
    )
    .expect("mini cluster");
    c.serve("web-1", 8080, None).unwrap();
    c.serve("web-2", 8080, None).unwrap();
    c
}

/// Service `web` (VIP:80 -> 8080) with web-1 and web-2 at these weights.
fn web(c: &Cluster, mode: &str, w1: u32, w2: u32) -> String {
    let (a, b) = (c.pod("web-1").ip, c.pod("web-2").ip);
    format!(
        "  - name: web\n    vip: {VIP}\n    mode: {mode}\n    ports: [{{ port: 80, targetPort: 8080 }}]\n    endpoints:\n      - {{ ip: {a}, node: node-a, weight: {w1} }}\n      - {{ ip: {b}, node: node-a, weight: {w2} }}\n"
    )
}

fn start(c: &Cluster, services: &str, extra: &[&str]) -> Daemon {
    let cfg = c.write_file("mesh.yaml", &c.config(services)).unwrap();
    c.start_daemon("node-a", &cfg, extra).unwrap()
}

struct Tally {
    by_backend: BTreeMap<String, u64>,
    failed: u64,
    peer_is_dialled: u64,
    direct: u64,
    text: String,
}

/// `n` requests from the client pod, each on a new connection.
fn tally(c: &Cluster, n: u32) -> Tally {
    let out =
        c.exec("client", "mt-pod", &["tally", &format!("{VIP}:80"), &n.to_string()], Duration::from_secs(120)).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "tally: {text}");
    let mut t = Tally { by_backend: BTreeMap::new(), failed: 0, peer_is_dialled: 0, direct: 0, text: text.clone() };
    for kv in text.lines().filter(|l| !l.starts_with("error:")).flat_map(str::split_whitespace) {
        let Some((k, v)) = kv.split_once('=') else {
            continue;
        };
        let v: u64 = v.parse().unwrap_or(0);
        match k {
            "failed" => t.failed = v,
            "peer_is_dialled" => t.peer_is_dialled = v,
            "direct" => t.direct = v,
            backend => {
                t.by_backend.insert(backend.to_owned(), v);
            }
        }
    }
    t
}

fn text(o: &Output) -> (i32, String, String) {
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn ctl(c: &Cluster, args: &[&str]) -> (i32, String, String) {
    text(&c.meshctl("node-a", args).unwrap())
}

fn ctl_json(c: &Cluster, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    let (code, out, err) = ctl(c, &a);
    assert_eq!(code, 0, "meshctl {args:?}: {err}{out}");
    serde_json::from_str(&out).unwrap()
}

fn generation(c: &Cluster) -> u64 {
    ctl_json(c, &["status"])["generation"].as_u64().unwrap()
}

#[test]
fn root_meshctl_apply_and_set_weight_change_routing_live() {
    let c = cluster();
    let d = start(&c, &web(&c, "proxy", 1, 1), &[]);
    let t = tally(&c, 20);
    assert_eq!(t.failed, 0, "{}", t.text);
    assert_eq!(t.peer_is_dialled, 20, "getpeername shows the VIP in proxy mode too: {}", t.text);

    // Drain web-1: everything goes to web-2.
    let w1 = c.pod("web-1").ip.to_string();
    let (code, out, err) = ctl(&c, &["set-weight", "web", &w1, "0"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "applied: generation 2");
    let t = tally(&c, 20);
    assert_eq!(t.by_backend, BTreeMap::from([("web-2".to_owned(), 20)]), "{}", t.text);

    // A whole new state that drains web-2 instead: everything to web-1.
    let only_web1 = c.config(&web(&c, "proxy", 5, 0));
    let f = c.write_file("only-web1.yaml", &only_web1).unwrap();
    // First offline, then as a dry run against the daemon: nothing moves.
    let (code, out, err) = ctl(&c, &["validate", "-f", f.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("valid (1 nodes, 3 workloads, 1 services, 0 routes, 0 policies)"), "{out}");
    let (code, out, err) = ctl(&c, &["apply", "--dry-run", "-f", f.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let w2 = c.pod("web-2").ip.to_string();
    assert!(out.starts_with("dry run: 2 change(s) to generation 2; nothing was applied"), "{out}");
    let row = |ip: &str, detail: &str| {
        out.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 5 && f[..4] == ["changed", "endpoint", "default/web", ip] && l.trim_end().ends_with(detail)
        })
    };
    assert!(row(&w1, "weight 0 -> 5") && row(&w2, "weight 1 -> 0"), "{out}");
    assert_eq!(generation(&c), 2, "a dry run applies nothing");
    let t = tally(&c, 10);
    assert_eq!(t.by_backend, BTreeMap::from([("web-2".to_owned(), 10)]), "{}", t.text);
    let (code, out, err) = ctl(&c, &["apply", "-f", f.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "applied: generation 3");
    let t = tally(&c, 20);
    assert_eq!(t.by_backend, BTreeMap::from([("web-1".to_owned(), 20)]), "{}", t.text);
    let eps = ctl_json(&c, &["get", "endpoints", "web"]);
    assert_eq!((eps[0]["weight"].as_u64(), eps[1]["weight"].as_u64()), (Some(5), Some(0)), "{eps}");
    drop(d);
}

#[test]
fn root_kernel_mode_follows_weights_and_drains() {
    let c = cluster();
    let d = start(&c, &web(&c, "kernel", 3, 2), &[]);
    let t = tally(&c, 2000);
    assert_eq!(t.failed, 0, "{}", t.text);
    let got = |b: &str| *t.by_backend.get(b).unwrap_or(&0);
    assert_eq!(got("web-1") + got("web-2"), 2000, "{}", t.text);
    mesh_tests::loadgen::assert_share(got("web-1"), 2000, 0.6, "kernel mode 3:2, web-1", &t.text);
    assert_eq!(t.peer_is_dialled, 2000, "getpeername must show the VIP: {}", t.text);
    assert_eq!(t.direct, 2000, "kernel mode has no proxy on the path: {}", t.text);
    assert_eq!(d.counter("proxy", "accepted").unwrap(), 0);
    assert_eq!(d.counter("kernel", "kernel_balanced").unwrap(), 2000);

    let w2 = c.pod("web-2").ip.to_string();
    assert_eq!(ctl(&c, &["set-weight", "web", &w2, "0"]).0, 0);
    let t = tally(&c, 200);
    assert_eq!(t.by_backend, BTreeMap::from([("web-1".to_owned(), 200)]), "drained web-2 got connections: {}", t.text);

    let w1 = c.pod("web-1").ip.to_string();
    assert_eq!(ctl(&c, &["set-weight", "web", &w1, "0"]).0, 0);
    let t = tally(&c, 5);
    assert_eq!(t.failed, 5, "{}", t.text);
    assert!(t.text.contains("Connection refused"), "no endpoint left must refuse at once: {}", t.text);
    assert_eq!(d.counter("kernel", "no_backend").unwrap(), 5);
}

/// A client as Java dials IPv4 by default: an `AF_INET6` socket with
/// IPV6_V6ONLY off, connecting to `::ffff:<VIP>:80` (which the kernel
/// routes as IPv4, through `cgroup/connect6`, not connect4). `n`
/// connections, one at a time: `NAME=COUNT` per backend, then `failed=F
/// peer_is_dialled=P` (P: getpeername gave `::ffff:<VIP>` port 80).
const MAPPED_CLIENT: &str = r#"
import socket, sys
addr, n = sys.argv[1], int(sys.argv[2])
counts, failed, dialled = {}, 0, 0
for _ in range(n):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.settimeout(3)
    try:
        s.connect((addr, 80))
        peer = s.getpeername()
        s.sendall(b"GET / HTTP/1.1\r\nHost: mesh\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            b = s.recv(65536)
            if not b:
                break
            data += b
        body = data.decode().splitlines()[-1]
        name = [kv[8:] for kv in body.split() if kv.startswith("backend=")][0]
        counts[name] = counts.get(name, 0) + 1
        dialled += peer[0] == addr and peer[1] == 80
    except Exception as e:
        failed += 1
        print("error:", e)
    finally:
        s.close()
print(" ".join(f"{k}={v}" for k, v in sorted(counts.items())), f"failed={failed} peer_is_dialled={dialled}")
"#;

fn mapped_tally(c: &Cluster, n: u32) -> Tally {
    let addr = format!("::ffff:{VIP}");
    let out =
        c.exec("client", "python3", &["-c", MAPPED_CLIENT, &addr, &n.to_string()], Duration::from_secs(120)).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "python: {text}{}", String::from_utf8_lossy(&out.stderr));
    let mut t = Tally { by_backend: BTreeMap::new(), failed: 0, peer_is_dialled: 0, direct: 0, text: text.clone() };
    for (k, v) in text
        .lines()
        .filter(|l| !l.starts_with("error:"))
        .flat_map(str::split_whitespace)
        .filter_map(|kv| kv.split_once('='))
    {
        let v: u64 = v.parse().unwrap_or(0);
        match k {
            "failed" => t.failed = v,
            "peer_is_dialled" => t.peer_is_dialled = v,
            b => {
                t.by_backend.insert(b.to_owned(), v);
            }
        }
    }
    t
}

#[test]
fn root_ipv4_mapped_dials_from_ipv6_sockets_are_meshed_in_both_modes() {
    let c = cluster();
    let d = start(&c, &web(&c, "proxy", 1, 1), &[]);
    let got = |t: &Tally, b: &str| *t.by_backend.get(b).unwrap_or(&0);
    let t = mapped_tally(&c, 40);
    assert_eq!(t.failed, 0, "{}", t.text);
    assert_eq!(got(&t, "web-1") + got(&t, "web-2"), 40, "{}", t.text);
    assert!(got(&t, "web-1") > 0 && got(&t, "web-2") > 0, "balanced over both: {}", t.text);
    assert_eq!(t.peer_is_dialled, 40, "getpeername shows ::ffff:{VIP}: {}", t.text);
    assert_eq!(d.counter("proxy", "accepted").unwrap(), 40, "through the proxy, which counts them");
    assert_eq!(d.counter("kernel", "ipv4_mapped").unwrap(), 40);
    let (_, metrics) = d.admin_get("/metrics").unwrap();
    let opened: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("mesh_connections_opened_total{service=\"default/web:80\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(opened, 40, "the proxy's metrics count each connection: {metrics}");

    let f = c.write_file("kernel.yaml", &c.config(&web(&c, "kernel", 7, 3))).unwrap();
    let (code, _, err) = ctl(&c, &["apply", "-f", f.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let t = mapped_tally(&c, 1000);
    assert_eq!(t.failed, 0, "{}", t.text);
    assert_eq!(got(&t, "web-1") + got(&t, "web-2"), 1000, "{}", t.text);
    mesh_tests::loadgen::assert_share(
        got(&t, "web-1"),
        1000,
        0.7,
        "kernel mode 7:3 from AF_INET6 sockets, web-1",
        &t.text,
    );
    assert_eq!(t.peer_is_dialled, 1000, "getpeername shows ::ffff:{VIP}: {}", t.text);
    assert_eq!(d.counter("kernel", "kernel_balanced").unwrap(), 1000);
    assert_eq!(d.counter("proxy", "accepted").unwrap(), 40, "no proxy on the path");
}

#[test]
fn root_removed_service_is_no_longer_redirected() {
    let c = cluster();
    let d = start(&c, &web(&c, "proxy", 1, 1), &[]);
    assert_eq!(c.curl("client", &format!("http://{VIP}/")).unwrap().0, 0);
    let (code, _, err) = ctl(&c, &["delete", "service", "web"]);
    assert_eq!(code, 0, "{err}");
    let (code, body) = c.curl("client", &format!("http://{VIP}/")).unwrap();
    assert_ne!(code, 0, "the VIP of a removed service still answers: {body}");
    assert_eq!(d.counter("kernel", "redirected").unwrap(), 1);
    assert!(ctl_json(&c, &["datapath", "dump"])["services"].as_array().unwrap().is_empty());
    let (code, _, err) = ctl(&c, &["delete", "service", "web"]);
    assert_eq!(code, 1);
    assert!(err.contains("service default/web not found"), "{err}");
}

#[test]
fn root_datapath_survives_kill9_and_restart_takes_it_over() {
    let c = cluster();
    let mut d = start(&c, &web(&c, "kernel", 1, 1), &[]);
    let programs = cgroup_programs(&c.node("node-a").cgroup).unwrap();
    assert_eq!(programs.len(), 5);
    // A write after the seed is a line of the journal, not a new file.
    let whole = std::fs::read(c.state_dir("node-a").join("state.json")).unwrap();
    assert_eq!(ctl(&c, &["set-weight", "web", &c.pod("web-1").ip.to_string(), "3"]).0, 0);
    let journal = c.state_dir("node-a").join("state.journal");
    assert_eq!(std::fs::read_to_string(&journal).unwrap().lines().count(), 1);
    assert_eq!(std::fs::read(c.state_dir("node-a").join("state.json")).unwrap(), whole);
    let before = ctl_json(&c, &["datapath", "dump"]);

    d.kill9();
    let t = tally(&c, 100);
    assert_eq!(t.failed, 0, "kernel mode broke while the daemon was down: {}", t.text);
    assert_eq!(t.by_backend.len(), 2, "{}", t.text);
    // As if the daemon had died in the middle of appending a write it
    // never answered.
    let mut f = std::fs::OpenOptions::new().append(true).open(&journal).unwrap();
    std::io::Write::write_all(&mut f, b"{\"generation\":3,\"inser").unwrap();

    let cfg = c.write_file("mesh.yaml", &c.config(&web(&c, "kernel", 1, 1))).unwrap();
    let d2 = c.start_daemon("node-a", &cfg, &[]).unwrap();
    assert_eq!(cgroup_programs(&c.node("node-a").cgroup).unwrap(), programs, "restart attached again");
    let after = ctl_json(&c, &["datapath", "dump"]);
    assert_eq!(after["services"], before["services"]);
    assert_eq!(after["workloads"], before["workloads"]);
    let status = ctl_json(&c, &["status"]);
    assert_eq!(status["datapath"]["reused_at_start"], true, "{status}");
    assert_eq!(status["generation"], 2, "state restored with its journal, not re-seeded: {status}");
    let weights: Vec<u64> =
        ctl_json(&c, &["get", "endpoints"]).as_array().unwrap().iter().map(|e| e["weight"].as_u64().unwrap()).collect();
    assert_eq!(weights, [3, 1], "the journaled write is back");
    assert!(d2.log_text().contains("a torn last line of the journal was cut off"), "{}", d2.log_text());
    // The config it was started with says weight 1: the saved state wins,
    // and the log says so and how to apply the config.
    let warned = d2.log_text();
    assert!(
        warned.contains("differs from the saved state (generation 2), which is served")
            && warned.contains(&format!("meshctl apply -f {}", cfg.display())),
        "{warned}"
    );
    assert_eq!(std::fs::read_to_string(&journal).unwrap().lines().count(), 1);
    let t = tally(&c, 20);
    assert_eq!(t.failed, 0, "{}", t.text);
    drop(d2);
}

#[test]
fn root_concurrent_applies_are_serialized() {
    let c = cluster();
    let d = start(&c, &web(&c, "proxy", 1, 1), &[]);
    let results: Vec<(u32, i32, String, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (1..=10u32)
            .map(|i| {
                let c = &c;
                s.spawn(move || {
                    let g = generation(c).to_string();
                    let f = c.write_file(&format!("apply-{i}.yaml"), &c.config(&web(c, "proxy", i, 1))).unwrap();
                    let (code, out, err) = ctl(c, &["apply", "-f", f.to_str().unwrap(), "--if-match", &g]);
                    (i, code, out, err)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut accepted = Vec::new();
    for (i, code, out, err) in &results {
        match code {
            0 => accepted.push((out.trim().strip_prefix("applied: generation ").unwrap().parse::<u64>().unwrap(), *i)),
            1 => assert!(err.contains("409"), "caller {i} failed other than by conflict: {err}"),
            other => panic!("caller {i}: exit {other}: {err}"),
        }
    }
    assert!(!accepted.is_empty(), "no write was accepted: {results:?}");
    accepted.sort();
    let mut gens: Vec<u64> = accepted.iter().map(|a| a.0).collect();
    gens.dedup();
    assert_eq!(gens.len(), accepted.len(), "two writes got the same generation: {accepted:?}");
    let (last_gen, last_i) = *accepted.last().unwrap();
    assert_eq!(generation(&c), last_gen);
    let svc = ctl_json(&c, &["get", "services", "web"]);
    assert_eq!(svc["endpoints"][0]["weight"], last_i, "final state is not the last accepted write: {svc}");
    eprintln!("{} of 10 concurrent applies accepted, the rest refused with 409", accepted.len());
    drop(d);
}

#[test]
fn root_invalid_write_changes_nothing() {
    let c = cluster();
    let d = start(&c, &web(&c, "proxy", 1, 1), &[]);
    let before = ctl_json(&c, &["datapath", "dump"]);
    let bad = format!(
        "{}  - name: api\n    vip: 10.96.0.20\n    ports: [{{ port: 80 }}]\n    endpoints: [{{ ip: 10.0.0.300, node: node-a }}]\n",
        web(&c, "proxy", 1, 1)
    );
    let f = c.write_file("bad.yaml", &c.config(&bad)).unwrap();
    // Offline, with no daemon asked, the same field and words.
    let offline = std::process::Command::new(&c.bins.meshctl)
        .args(["--socket", "/nonexistent/mesh.sock", "validate", "-f"])
        .arg(&f)
        .output()
        .unwrap();
    let (code, _, err) = text(&offline);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(r#"services[1].endpoints[0].ip: "10.0.0.300" is not an IP address (IPv4 or IPv6)"#), "{err}");
    let (code, _, err) = ctl(&c, &["apply", "--dry-run", "-f", f.to_str().unwrap()]);
    assert_eq!(code, 1, "a dry run is checked as the write: {err}");
    let (code, _, err) = ctl(&c, &["apply", "-f", f.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("400")
            && err.contains(r#"services[1].endpoints[0].ip: "10.0.0.300" is not an IP address (IPv4 or IPv6)"#),
        "{err}"
    );
    assert_eq!(generation(&c), 1);
    let after = ctl_json(&c, &["datapath", "dump"]);
    assert_eq!(after["services"], before["services"], "a refused write reached the kernel");
    drop(d);
}

#[test]
fn root_api_checks_caller_credentials() {
    let c = cluster();
    let d = start(&c, &web(&c, "proxy", 1, 1), &["--api-group", "nogroup"]);
    let sock = c.api_socket("node-a");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o660);
    let member = text(&c.meshctl_as("node-a", Some((65534, 65534)), &["status"]).unwrap());
    assert_eq!(member.0, 0, "a member of the API group was refused: {}", member.2);
    // Loosen the socket so a stranger can connect at all; the daemon must
    // still refuse it.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (code, _, err) = text(&c.meshctl_as("node-a", Some((12345, 12345)), &["status"]).unwrap());
    assert_eq!(code, 1);
    assert!(
        err.contains("403")
            && err.contains("uid 12345 may not use the mesh API: only root and members of group nogroup may"),
        "{err}"
    );
    drop(d);
}

#[test]
fn root_corrupt_state_file_stops_the_start() {
    let c = cluster();
    let state = c.state_dir("node-a");
    std::fs::create_dir_all(&state).unwrap();
    let file = state.join("state.json");
    std::fs::write(&file, "{ \"generation\": 3, oops").unwrap();
    let cfg = c.write_file("mesh.yaml", &c.config(&web(&c, "proxy", 1, 1))).unwrap();
    let err = match c.start_daemon("node-a", &cfg, &[]) {
        Ok(_) => panic!("the daemon started on a corrupt state file"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(&format!("state file {} is corrupt", file.display())) && err.contains("left as it is"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "{ \"generation\": 3, oops");
    assert!(
        cgroup_programs(&c.node("node-a").cgroup).unwrap().is_empty(),
        "programs attached despite the failed start"
    );
}

#[test]
fn root_unenroll_and_enroll_switch_redirection_live() {
    let c = cluster();
    let d = start(&c, &web(&c, "proxy", 1, 1), &[]);
    assert_eq!(c.curl("client", &format!("http://{VIP}/")).unwrap().0, 0);
    let (code, _, err) = ctl(&c, &["unenroll", "client"]);
    assert_eq!(code, 0, "{err}");
    let (code, body) = c.curl("client", &format!("http://{VIP}/")).unwrap();
    assert_ne!(code, 0, "an unenrolled pod is still redirected: {body}");
    assert_eq!(d.counter("kernel", "not_enrolled").unwrap(), 1);

    let p = c.pod("client");
    let (ip, netns) = (p.ip.to_string(), p.netns.display().to_string());
    let (code, _, err) = ctl(&c, &["enroll", "client", "--node", "node-a", "--ip", &ip, "--netns", &netns]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(c.curl("client", &format!("http://{VIP}/")).unwrap().0, 0, "enrolled again, but not redirected");
    let wl = ctl_json(&c, &["get", "workloads", "client"]);
    assert_eq!(wl["netns"], netns.as_str());

    // A netns that does not exist is refused, naming the field.
    let (code, _, err) =
        ctl(&c, &["enroll", "ghost", "--node", "node-a", "--ip", "10.244.1.99", "--netns", "/var/run/netns/nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("netns: cannot open network namespace /var/run/netns/nope"), "{err}");
}

/// `n` kernel-mode services `k0`, `k1`, … (VIPs 10.97.x.y, port 80 ->
/// 8080) over web-1 and web-2, without active checks.
fn kernel_services(c: &Cluster, n: usize) -> String {
    let (a, b) = (c.pod("web-1").ip, c.pod("web-2").ip);
    (0..n)
        .map(|i| {
            format!(
                "  - {{ name: k{i}, vip: 10.97.{}.{}, mode: kernel, ports: [{{ port: 80, targetPort: 8080 }}], healthCheck: {{ protocol: none }}, endpoints: [{{ ip: {a}, node: node-a }}, {{ ip: {b}, node: node-a }}] }}\n",
                i / 250,
                i % 250 + 1
            )
        })
        .collect()
}

/// What a refused write must leave as it was: the state file, the
/// generation, the services and the maps; and traffic still flows.
struct Before {
    file: std::path::PathBuf,
    saved: Vec<u8>,
    services: serde_json::Value,
    dump: serde_json::Value,
}

impl Before {
    fn take(c: &Cluster) -> Self {
        let file = c.state_dir("node-a").join("state.json");
        let saved = std::fs::read(&file).unwrap();
        Before { file, saved, services: ctl_json(c, &["get", "services"]), dump: ctl_json(c, &["datapath", "dump"]) }
    }

    fn check(&self, c: &Cluster) {
        assert_eq!(std::fs::read(&self.file).unwrap(), self.saved, "the refused state was saved");
        assert_eq!(generation(c), 1);
        assert_eq!(ctl_json(c, &["get", "services"]), self.services);
        assert_eq!(
            ctl_json(c, &["datapath", "dump"])["services"],
            self.dump["services"],
            "a refused write reached the kernel"
        );
        let t = tally(c, 20);
        assert_eq!(t.failed, 0, "{}", t.text);
    }
}

/// Applies `services` (file `name`) and expects a refusal: meshctl's stderr.
fn apply_refused(c: &Cluster, name: &str, services: &str) -> String {
    let f = c.write_file(name, &c.config(services)).unwrap();
    let (code, out, err) = ctl(c, &["apply", "-f", f.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    err
}

#[test]
fn root_a_write_that_overflows_the_maps_is_refused_and_changes_nothing() {
    let c = cluster();
    // A slot map of 1000 entries (the default holds 262 144).
    let d = start(&c, &web(&c, "proxy", 1, 1), &["--slot-entries", "1000"]);
    let before = Before::take(&c);

    // 600 kernel tables of two equal endpoints: 2 slots each, plus room
    // to rewrite one: 1202 > 1000.
    let err = apply_refused(&c, "big.yaml", &format!("{}{}", web(&c, "proxy", 1, 1), kernel_services(&c, 600)));
    assert!(err.contains("400") && err.contains("nothing was changed"), "{err}");
    assert!(
        err.contains("map SLOTS: the kernel-mode services need 1202 entries")
            && err.contains("the map holds 1000 (--slot-entries)")
            && err.contains("larger --slot-entries"),
        "{err}"
    );
    before.check(&c);
    // What fits is applied: 400 tables need 802.
    let fits = format!("{}{}", web(&c, "proxy", 1, 1), kernel_services(&c, 400));
    let f = c.write_file("fits.yaml", &c.config(&fits)).unwrap();
    let (code, _, err) = ctl(&c, &["apply", "-f", f.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let dump = ctl_json(&c, &["datapath", "dump"]);
    let kernel = dump["services"].as_array().unwrap().iter().filter(|s| s["mode"] == "kernel").count();
    assert_eq!(kernel, 400);
    assert!(d.log_text().contains("state seeded"), "{}", d.log_text());
}

#[test]
fn root_a_kernel_error_in_the_middle_of_a_sync_puts_the_maps_back_and_saves_nothing() {
    let c = cluster();
    let small = format!("{}{}", web(&c, "proxy", 1, 1), kernel_services(&c, 10));
    let _d = start(&c, &small, &["--slot-entries", "60"]);
    let before = Before::take(&c);
    // 10 tables of 2 slots use 20 of 60 entries; 40 more entries written
    // behind the daemon's back fill the map.
    let slots = c.node("node-a").pin_dir.join("SLOTS");
    for i in 0u32..40 {
        let mut key: Vec<u8> = 999_999u32.to_le_bytes().to_vec();
        key.extend(0u32.to_le_bytes());
        key.extend(i.to_le_bytes());
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>();
        let mut args = vec!["map".to_owned(), "update".into(), "pinned".into(), slots.display().to_string()];
        args.push("key".into());
        args.push("hex".into());
        args.extend(hex(&key));
        // A backend, 10.0.0.1:8080, as SLOTS holds it: the IPv4-mapped
        // address (::ffff:10.0.0.1), the port, two bytes of padding.
        args.extend(["value", "hex"].map(str::to_owned));
        args.extend(hex(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1, 0x1f, 0x90, 0, 0]));
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        mesh_tests::sys::bpftool(&a).unwrap();
    }
    // 20 tables pass planning (42 <= 60) but the kernel refuses the first
    // new slot: the write fails, the maps are put back, nothing is saved.
    let more = format!("{}{}", web(&c, "proxy", 1, 1), kernel_services(&c, 20));
    let err = apply_refused(&c, "more.yaml", &more);
    assert!(
        err.contains("the kernel maps could not be updated")
            && err.contains("map SLOTS")
            && err.contains("they were put back as generation 1; nothing was saved"),
        "{err}"
    );
    before.check(&c);
    // The foreign entries went with the rollback: the write goes through now.
    let f = c.dir.join("more.yaml");
    let (code, _, err) = ctl(&c, &["apply", "-f", f.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(generation(&c), 2);
}

#[test]
fn root_a_saved_state_that_no_longer_fits_keeps_the_daemon_up_and_not_ready() {
    let c = cluster();
    // 40 kernel tables of 2 slots (82 entries with room for a rewrite);
    // the daemon leaves nothing pinned, so the next one makes a new map.
    let config = format!("{}{}", web(&c, "proxy", 1, 1), kernel_services(&c, 40));
    let mut d = start(&c, &config, &["--cleanup-on-exit"]);
    assert_eq!(ctl_json(&c, &["datapath", "dump"])["services"].as_array().unwrap().len(), 41);
    d.stop().unwrap();

    let d = c.start_daemon_live("node-a", &["--slot-entries", "50"]).unwrap();
    let (status, body) = d.admin_get("/ready").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("the saved state (generation 1) does not fit the kernel maps")
            && body.contains("map SLOTS: the kernel-mode services need 82 entries")
            && body.contains("holds 50"),
        "{body}"
    );
    assert!(d.log_with("does not fit the kernel maps", 1).contains("does not fit the kernel maps"));
    let (code, out, _) = ctl(&c, &["status"]);
    assert_eq!(code, 0);
    assert!(out.contains("ready:       no: the saved state"), "{out}");

    // What fits is served: the proxy-mode service, the kernel tables that
    // fit (24 of 2 slots, with 2 to spare for a rewrite) and, through the
    // proxy, the rest.
    let t = tally(&c, 20);
    assert_eq!(t.failed, 0, "{}", t.text);
    let dump = ctl_json(&c, &["datapath", "dump"]);
    let modes: Vec<&str> = dump["services"].as_array().unwrap().iter().map(|s| s["mode"].as_str().unwrap()).collect();
    assert_eq!(modes.iter().filter(|m| **m == "kernel").count(), 24, "{modes:?}");
    for vip in ["10.97.0.1", "10.97.0.40"] {
        let (code, body) = c.curl("client", &format!("http://{vip}/")).unwrap();
        assert_eq!(code, 0, "{vip}: {body}");
        assert!(body.starts_with("backend=web-"), "{vip}: {body}");
    }

    // Writes must fit: the same tables do not, a smaller state does.
    let w1 = c.pod("web-1").ip.to_string();
    let (code, _, err) = ctl(&c, &["set-weight", "web", &w1, "2"]);
    assert_eq!(code, 1);
    assert!(err.contains("map SLOTS") && err.contains("--slot-entries"), "{err}");
    let small = format!("{}{}", web(&c, "proxy", 1, 1), kernel_services(&c, 10));
    let f = c.write_file("small.yaml", &c.config(&small)).unwrap();
    let (code, _, err) = ctl(&c, &["apply", "-f", f.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(d.admin_get("/ready").unwrap().0, 200, "a state that fits makes the daemon ready again");
    let dump = ctl_json(&c, &["datapath", "dump"]);
    let kernel: Vec<usize> = dump["services"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["mode"] == "kernel")
        .map(|s| s["slots"].as_array().unwrap().len())
        .collect();
    assert_eq!(kernel, vec![2; 10]);
}

#[test]
fn root_readiness_metrics_and_status_answer_while_a_write_is_stuck_saving() {
    let c = cluster();
    let d = start(&c, &web(&c, "proxy", 1, 1), &[]);
    // The save's journal is a FIFO: opening it for writing blocks until
    // someone reads, so the write stays in progress, holding the state,
    // until the test lets it go.
    let tmp = c.state_dir("node-a").join("state.journal");
    let path = std::ffi::CString::new(tmp.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo only creates a file.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0, "mkfifo");
    let w1 = c.pod("web-1").ip.to_string();
    let writer = {
        let (sock, meshctl) = (c.api_socket("node-a"), c.bins.meshctl.clone());
        std::thread::spawn(move || {
            std::process::Command::new(meshctl)
                .arg("--socket")
                .arg(sock)
                .args(["set-weight", "web", &w1, "5"])
                .output()
                .unwrap()
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    assert!(!writer.is_finished(), "the write should be stuck opening the FIFO");

    let (status, body) = d.admin_get("/ready").unwrap();
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    let (status, metrics) = d.admin_get("/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(metrics.contains("mesh_state_generation 1"), "{metrics}");
    assert!(metrics.contains("mesh_kernel_events_total{counter=\"redirected\"}"), "{metrics}");
    assert_eq!(generation(&c), 1, "meshctl status answers too");
    assert!(!writer.is_finished());

    // Let it go: the FIFO takes the bytes but cannot be fsynced, so the
    // save fails; the maps are put back and nothing is saved.
    let mut fifo = std::fs::File::open(&tmp).unwrap();
    let mut sink = Vec::new();
    std::io::Read::read_to_end(&mut fifo, &mut sink).unwrap();
    let (code, _, err) = text(&writer.join().unwrap());
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot save the state"), "{err}");
    std::fs::remove_file(&tmp).unwrap();
    assert_eq!(generation(&c), 1);
    let weights: Vec<u64> =
        ctl_json(&c, &["get", "endpoints"]).as_array().unwrap().iter().map(|e| e["weight"].as_u64().unwrap()).collect();
    assert_eq!(weights, [1, 1], "the refused write changed nothing");
    assert_eq!(ctl(&c, &["set-weight", "web", &c.pod("web-1").ip.to_string(), "5"]).0, 0, "writes work again");
}
