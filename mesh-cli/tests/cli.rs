//! The daemon binary refuses a bad config before touching the system, and
//! names every bad field. No root needed: it fails before any attach.

use std::process::Command;

fn daemon() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mesh-daemon"))
}

/// `mesh-daemon run` with every path in a scratch folder and a cgroup that
/// does not exist, so that even a regression cannot touch the host.
fn run(config: &std::path::Path, node: &str) -> std::process::Output {
    let scratch = config.parent().unwrap().join(format!("scratch-{node}"));
    daemon()
        .args(["run", "--node", node, "--cgroup", "/nonexistent/cgroup", "--admin-listen", "127.0.0.1:0"])
        .args(["--proxy-listen", "127.0.0.1:0"])
        .arg("--config")
        .arg(config)
        .arg("--state-dir")
        .arg(scratch.join("state"))
        .arg("--pin-dir")
        .arg(scratch.join("pins"))
        .arg("--api-socket")
        .arg(scratch.join("api.sock"))
        .output()
        .unwrap()
}

/// A folder of one test's own, removed when the test ends, passed or
/// failed.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("mesh-cli-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn write(&self, name: &str, text: &str) -> std::path::PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const BAD: &str = r#"
nodes: [{ name: node-a, address: 172.18.0.2 }]
services:
  - name: web
    vip: 10.96.0.10
    ports: [{ port: 80 }]
  - name: api
    vip: 10.96.0.11
    ports: [{ port: 80 }]
    endpoints:
      - { ip: 10.0.0.300, node: node-a, weight: 70000 }
"#;

#[test]
fn run_refuses_a_bad_config_naming_every_field() {
    let dir = Scratch::new("bad-config");
    let cfg = dir.write("bad.yaml", BAD);
    let out = run(&cfg, "node-a");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(r#"services[1].endpoints[0].ip: "10.0.0.300" is not an IP address (IPv4 or IPv6)"#), "{err}");
    assert!(err.contains("services[1].endpoints[0].weight: weight 70000 is above the maximum 65535"), "{err}");
    assert!(!cfg.parent().unwrap().join("scratch-node-a/state/state.json").exists(), "nothing saved");
}

#[test]
fn run_refuses_an_unknown_node() {
    let dir = Scratch::new("unknown-node");
    let cfg = dir.write("good.yaml", "nodes: [{ name: node-a, address: 172.18.0.2 }]\n");
    let out = run(&cfg, "node-z");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--node node-z: no such node in") && err.contains("the nodes there are: node-a"), "{err}");
}

#[test]
fn check_validates_without_running() {
    let dir = Scratch::new("check");
    let good = dir.write("check-good.yaml", "nodes: [{ name: node-a, address: 172.18.0.2 }]\n");
    let out = daemon().arg("check").arg("--config").arg(&good).output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid (1 nodes, 0 workloads, 0 services)"));
    let bad = dir.write("check-bad.yaml", "nodes: [{ name: node-a, adress: 1.2.3.4 }]\n");
    let out = daemon().arg("check").arg("--config").arg(&bad).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("nodes[0]: unknown field `adress`"), "{err}");
}
