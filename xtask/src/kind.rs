//! `cargo xtask kind`: the mesh on a real Kubernetes cluster in Docker.
//!
//! Creates (or reuses) the kind cluster of `deploy/kind-config.yaml`,
//! builds the image from `deploy/Dockerfile` and loads it into the nodes,
//! makes the mesh CA (the Secret mesh-ca, mounted by the issuer only, and
//! its certificate as the ConfigMap mesh-trust for the daemons), applies
//! `deploy/` (the issuer first) and `deploy/example`, and checks that the
//! daemons got their certificates from the issuer and that the meshed
//! client pod reaches the `web` Service through the mesh: the daemon on the
//! client's node logs the connection and counts it in its metrics. Then it
//! says how to clean up.

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::root;

pub const CLUSTER: &str = "mesh";
const IMAGE: &str = "mesh-daemon:dev";
const SERVICE: &str = "demo/web:80";

fn say(msg: &str) {
    eprintln!("kind: {msg}");
}

/// What the kind path needs, each with how to get it.
const TOOLS: [(&str, &str); 3] = [
    ("docker", "Docker Engine: https://docs.docker.com/engine/install/"),
    ("kind", "kind: https://kind.sigs.k8s.io/docs/user/quick-start/#installation"),
    ("kubectl", "kubectl: https://kubernetes.io/docs/tasks/tools/"),
];

fn on_path(path: &OsStr, name: &str) -> Option<PathBuf> {
    std::env::split_paths(path).map(|d| d.join(name)).find(|p| {
        std::fs::metadata(p)
            .is_ok_and(|m| m.is_file() && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0)
    })
}

/// Checks that docker, kind and kubectl are on `path` and that Docker's
/// engine answers. The error names everything missing and how to get it.
pub fn preflight(path: &OsStr) -> anyhow::Result<()> {
    let mut missing = Vec::new();
    let mut docker = None;
    for (name, how) in TOOLS {
        match on_path(path, name) {
            Some(p) if name == "docker" => docker = Some(p),
            Some(_) => {}
            None => missing.push(format!("  - {name} is not on the PATH; install {how}")),
        }
    }
    if let Some(docker) = docker {
        let out = Command::new(&docker).arg("info").env("PATH", path).stdin(Stdio::null()).output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                let err = String::from_utf8_lossy(&o.stderr);
                let first = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("no output");
                missing.push(format!(
                    "  - Docker's engine does not answer (`docker info`: {first}); start it (e.g. `systemctl start docker`) \
                     or point DOCKER_HOST at one"
                ));
            }
            Err(e) => missing.push(format!("  - cannot run {}: {e}", docker.display())),
        }
    }
    if !missing.is_empty() {
        bail!(
            "the kind end-to-end needs Docker, kind and kubectl:\n{}\n\
             Without them, `cargo xtask test` checks deploy/ offline (schemas, Dockerfile, flags).",
            missing.join("\n")
        );
    }
    Ok(())
}

/// Runs `cmd`, streaming its output, after saying what it is.
fn step(what: &str, cmd: &mut Command) -> anyhow::Result<()> {
    say(what);
    crate::run(cmd.stdin(Stdio::null()))
}

/// Runs `cmd` and returns its stdout (stderr passes through).
fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .current_dir(root())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn kubectl(args: &[&str]) -> Command {
    let mut c = Command::new("kubectl");
    c.args(["--context", &format!("kind-{CLUSTER}")]).args(args);
    c
}

pub fn kind() -> anyhow::Result<()> {
    preflight(&std::env::var_os("PATH").unwrap_or_default())?;
    let started = Instant::now();

    let clusters = output(Command::new("kind").args(["get", "clusters"]))?;
    if clusters.lines().any(|l| l.trim() == CLUSTER) {
        say(&format!("reusing the kind cluster {CLUSTER:?}"));
    } else {
        step(
            &format!("creating the kind cluster {CLUSTER:?} from deploy/kind-config.yaml (a few minutes)"),
            Command::new("kind").args(["create", "cluster", "--config", "deploy/kind-config.yaml", "--wait", "120s"]),
        )?;
    }
    step(
        &format!("building {IMAGE} from deploy/Dockerfile (the first build compiles everything: ~10 minutes)"),
        Command::new("docker").args(["build", "-f", "deploy/Dockerfile", "-t", IMAGE, "."]),
    )?;
    step(
        &format!("loading {IMAGE} into the nodes"),
        Command::new("kind").args(["load", "docker-image", IMAGE, "--name", CLUSTER]),
    )?;

    step("applying deploy/namespace.yaml", &mut kubectl(&["apply", "-f", "deploy/namespace.yaml"]))?;
    ca_secret()?;
    step("applying deploy/ (RBAC, the issuer and the DaemonSet)", &mut kubectl(&["apply", "-k", "deploy/"]))?;
    // A rebuilt image under the same tag: restart onto it, the issuer
    // first (daemons wait for their certificates from it).
    for (workload, what) in [
        ("deployment/mesh-issuer", "the issuer (two replicas)"),
        ("daemonset/mesh-daemon", "a mesh-daemon on every node"),
    ] {
        step(
            &format!("restarting {workload} onto the image just loaded"),
            &mut kubectl(&["-n", "mesh-system", "rollout", "restart", workload]),
        )?;
        step(
            &format!("waiting for {what}"),
            &mut kubectl(&["-n", "mesh-system", "rollout", "status", workload, "--timeout=300s"]),
        )?;
    }
    step(
        "applying deploy/example (namespace demo: web ×2 and client)",
        &mut kubectl(&["apply", "-k", "deploy/example"]),
    )?;
    for d in ["web", "client"] {
        step(
            &format!("waiting for deployment demo/{d}"),
            &mut kubectl(&["-n", "demo", "rollout", "status", &format!("deployment/{d}"), "--timeout=300s"]),
        )?;
    }

    check_issued()?;
    check_traffic()?;
    check_rollout()?;
    say(&format!(
        "done in {:.0?}: the client reached demo/web through the mesh, and through a rolling update of the daemons",
        started.elapsed()
    ));
    say("explore:  kubectl --context kind-mesh -n mesh-system logs daemonset/mesh-daemon");
    say("          kubectl --context kind-mesh -n mesh-system exec daemonset/mesh-daemon -- meshctl get services");
    say(&format!("clean up: kind delete cluster --name {CLUSTER}"));
    Ok(())
}

/// Whether `kind/name` exists in mesh-system.
fn exists(kind: &str, name: &str) -> bool {
    kubectl(&["-n", "mesh-system", "get", kind, name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The mesh CA: the Secret mesh-ca (certificate and key, for the issuer
/// only), made once with `mesh-daemon ca init` from the image and kept when
/// it exists; and the ConfigMap mesh-trust (the certificate alone, the
/// daemons' trust bundle), made from the Secret when missing.
fn ca_secret() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("mesh-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = |name: &str| {
        let mut f = OsString::from(format!("{name}="));
        f.push(dir.join(name));
        f
    };
    let result = (|| {
        if exists("secret", "mesh-ca") {
            say("the mesh CA Secret mesh-system/mesh-ca exists; keeping it");
        } else {
            let mut mount = OsString::from(dir.as_os_str());
            mount.push(":/out");
            step(
                "making the mesh CA (mesh-daemon ca init, in the image)",
                Command::new("docker")
                    .args(["run", "--rm", "-v"])
                    .arg(&mount)
                    .args([IMAGE, "ca", "init", "--out", "/out"]),
            )?;
            let mut create = kubectl(&["-n", "mesh-system", "create", "secret", "generic", "mesh-ca"]);
            create.arg("--from-file").arg(file("ca.pem")).arg("--from-file").arg(file("ca.key"));
            step("storing it as the Secret mesh-system/mesh-ca (mounted by the issuer only)", &mut create)?;
        }
        if exists("configmap", "mesh-trust") {
            say("the trust bundle ConfigMap mesh-system/mesh-trust exists; keeping it");
            return Ok(());
        }
        let cert = output(&mut kubectl(&[
            "-n",
            "mesh-system",
            "get",
            "secret",
            "mesh-ca",
            "-o",
            "go-template={{index .data \"ca.pem\" | base64decode}}",
        ]))?;
        if !cert.contains("BEGIN CERTIFICATE") {
            bail!("the Secret mesh-system/mesh-ca has no ca.pem certificate");
        }
        std::fs::write(dir.join("ca.pem"), cert)?;
        let mut create = kubectl(&["-n", "mesh-system", "create", "configmap", "mesh-trust"]);
        create.arg("--from-file").arg(file("ca.pem"));
        step("storing its certificate as the ConfigMap mesh-system/mesh-trust (the daemons' trust bundle)", &mut create)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The mesh-daemon pods (`pod/NAME`), of one node or all.
fn daemon_pods(node: Option<&str>) -> anyhow::Result<Vec<String>> {
    let mut cmd =
        kubectl(&["-n", "mesh-system", "get", "pod", "-l", "app.kubernetes.io/name=mesh-daemon", "-o", "name"]);
    if let Some(n) = node {
        cmd.args(["--field-selector", &format!("spec.nodeName={n}")]);
    }
    Ok(output(&mut cmd)?.lines().map(str::trim).filter(|p| !p.is_empty()).map(str::to_owned).collect())
}

/// Every daemon got its certificates from the issuer (it holds no CA key).
fn check_issued() -> anyhow::Result<()> {
    say("checking: every daemon's certificates come from the issuer");
    for pod in daemon_pods(None)? {
        let pod = pod.as_str();
        let logs = output(&mut kubectl(&["-n", "mesh-system", "logs", pod]))?;
        if !logs.contains("certificates come from the issuer") {
            bail!("{pod} did not get its certificates from the issuer; its log:\n{logs}");
        }
        say(&format!("  {pod}: certificates from the issuer"));
    }
    Ok(())
}

/// The client curls the Service until it answers; then the daemon on the
/// client's node must show the connection in its access log and metrics.
fn check_traffic() -> anyhow::Result<()> {
    say("checking: client -> http://web.demo/ through the mesh");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = kubectl(&[
            "-n",
            "demo",
            "exec",
            "deploy/client",
            "--",
            "curl",
            "-sS",
            "--max-time",
            "5",
            "http://web.demo/",
        ])
        .stdin(Stdio::null())
        .output()?;
        if out.status.success() {
            break;
        }
        if Instant::now() > deadline {
            bail!("the client could not reach http://web.demo/ in 2 minutes: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_secs(3));
    }
    let node = output(&mut kubectl(&[
        "-n",
        "demo",
        "get",
        "pod",
        "-l",
        "app=client",
        "-o",
        "jsonpath={.items[0].spec.nodeName}",
    ]))?;
    let daemons = daemon_pods(Some(node.trim()))?;
    let Some(daemon) = daemons.first().map(String::as_str) else {
        bail!("no mesh-daemon pod on node {}", node.trim());
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let logs = output(&mut kubectl(&["-n", "mesh-system", "logs", daemon]))?;
        let logged = logs.lines().any(|l| l.contains("\"target\":\"access\"") && l.contains(SERVICE));
        let stats =
            output(&mut kubectl(&["-n", "mesh-system", "exec", daemon, "--", "meshctl", "-o", "json", "stats"]))?;
        let rows: serde_json::Value = serde_json::from_str(&stats).context("meshctl -o json stats")?;
        let opened: u64 = rows
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["service"] == SERVICE)
            .filter_map(|r| r["opened"].as_u64())
            .sum();
        if logged && opened > 0 {
            say(&format!(
                "  {daemon} on {}: access log has {SERVICE}; {opened} connection(s) in its metrics",
                node.trim()
            ));
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{daemon} on {} did not show the connection (access log: {logged}, opened: {opened})", node.trim());
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// Requests the client makes while the DaemonSet rolls: 10/s for 90 s.
const ROLLOUT_REQUESTS: u32 = 900;

/// The client's loop: one new connection per request, a status per line.
fn rollout_loop(requests: u32) -> String {
    format!(
        "for i in $(seq 1 {requests}); do \
           curl -s -o /dev/null -w '%{{http_code}}\\n' --max-time 5 http://web.demo/ || echo failed; \
           sleep 0.1; done"
    )
}

/// The statuses of the loop's requests that were not 200.
fn failed_requests(out: &str) -> Vec<&str> {
    out.lines().map(str::trim).filter(|l| !l.is_empty() && *l != "200").collect()
}

/// Rolls the DaemonSet once (maxSurge 1: each node's new daemon takes the
/// listeners over from the old one) while the client keeps making new
/// connections, and reports the requests that failed.
fn check_rollout() -> anyhow::Result<()> {
    say(&format!("checking: {ROLLOUT_REQUESTS} requests from the client while the daemons roll (hitless handover)"));
    let client = kubectl(&["-n", "demo", "exec", "deploy/client", "--", "sh", "-c", &rollout_loop(ROLLOUT_REQUESTS)])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the client's request loop")?;
    std::thread::sleep(Duration::from_secs(5));
    let rolled = step(
        "restarting daemonset/mesh-daemon",
        &mut kubectl(&["-n", "mesh-system", "rollout", "restart", "daemonset/mesh-daemon"]),
    )
    .and_then(|_| {
        step(
            "waiting for the rollout",
            &mut kubectl(&["-n", "mesh-system", "rollout", "status", "daemonset/mesh-daemon", "--timeout=300s"]),
        )
    });
    let out = client.wait_with_output().context("waiting for the client's request loop")?;
    rolled?;
    let text = String::from_utf8_lossy(&out.stdout);
    let failed = failed_requests(&text);
    let total = text.lines().filter(|l| !l.trim().is_empty()).count();
    say(&format!("  {total} requests during the rollout, {} failed", failed.len()));
    if !failed.is_empty() || total == 0 {
        bail!("requests failed during the rolling update of the daemons: {failed:?}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Writes an executable script from a child `sh`, never from this
    /// process: a file this process holds open for writing is inherited by
    /// any child another test thread forks meanwhile, and exec of the script
    /// then fails with ETXTBSY ("Text file busy") until that child execs.
    fn fake_bin(dir: &Path, name: &str, script: &str) {
        let p = dir.join(name);
        let body = format!("#!/bin/sh\n{script}\n");
        let st = Command::new("sh")
            .args(["-c", "printf '%s' \"$1\" > \"$2.tmp\" && chmod 755 \"$2.tmp\" && mv -f \"$2.tmp\" \"$2\"", "sh"])
            .arg(&body)
            .arg(&p)
            .status()
            .unwrap();
        assert!(st.success(), "writing {}", p.display());
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("xtask-kind-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn without_the_tools_it_names_each_one_and_how_to_get_it() {
        let d = temp_dir("none");
        let e = preflight(d.as_os_str()).unwrap_err().to_string();
        for (name, how) in TOOLS {
            assert!(e.contains(&format!("{name} is not on the PATH")) && e.contains(how), "{e}");
        }
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_docker_client_without_an_engine_is_not_enough() {
        let d = temp_dir("noengine");
        fake_bin(
            &d,
            "docker",
            "echo 'Cannot connect to the Docker daemon at unix:///var/run/docker.sock.' >&2; exit 1",
        );
        fake_bin(&d, "kind", "exit 0");
        fake_bin(&d, "kubectl", "exit 0");
        let e = preflight(d.as_os_str()).unwrap_err().to_string();
        assert!(
            e.contains("Docker's engine does not answer") && e.contains("Cannot connect to the Docker daemon"),
            "{e}"
        );
        assert!(!e.contains("not on the PATH"), "{e}");
        fake_bin(&d, "docker", "exit 0");
        preflight(d.as_os_str()).unwrap();
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn the_rollout_loop_reports_each_request_and_counts_the_failed_ones() {
        let d = temp_dir("rollout");
        // curl answers 200 when asked for the status line as the loop asks,
        // and fails its second call.
        let n = d.join("calls");
        fake_bin(
            &d,
            "curl",
            &format!(
                "echo x >> {n}; [ $(wc -l < {n}) -eq 2 ] && exit 7; \
                 for a in \"$@\"; do [ \"$a\" = '%{{http_code}}\\n' ] && printf '200\\n' && exit 0; done; echo bad-args",
                n = n.display()
            ),
        );
        let path = format!("{}:{}", d.display(), std::env::var("PATH").unwrap_or_default());
        let out = Command::new("sh").args(["-c", &rollout_loop(3)]).env("PATH", path).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(text, "200\nfailed\n200\n");
        assert_eq!(failed_requests(&text), ["failed"]);
        std::fs::remove_dir_all(d).unwrap();
    }
}
