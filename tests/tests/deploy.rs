//! The Kubernetes manifests in `deploy/`, checked offline (no cluster
//! here): they render with `kubectl kustomize`, every rendered object
//! validates against the OpenAPI schema of a current Kubernetes release
//! (`kubernetes-validate --strict`, which `cargo xtask setup` installs),
//! and the DaemonSet has what the datapath needs.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The Kubernetes release the manifests are validated against.
const KUBERNETES: &str = "1.33.0";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// `kubectl`, or `python3 -m kubernetes_validate`; fails clearly when missing.
fn tool(name: &str) -> Command {
    let cmd = match name {
        "kubernetes-validate" => {
            let mut c = Command::new("python3");
            c.args(["-m", "kubernetes_validate"]);
            c
        }
        _ => Command::new(name),
    };
    let version: &[&str] = if name == "kubectl" { &["version", "--client"] } else { &["--version"] };
    let probe = Command::new(cmd.get_program()).args(cmd.get_args()).args(version).output();
    assert!(
        probe.is_ok_and(|o| o.status.success()),
        "{name} is not installed: run `cargo xtask setup` (kubectl comes with the machine, kubernetes-validate from PyPI)"
    );
    cmd
}

/// `kubectl kustomize DIR`, as text.
fn render(dir: &str) -> String {
    let out = tool("kubectl").arg("kustomize").arg(root().join(dir)).output().unwrap();
    assert!(out.status.success(), "kubectl kustomize {dir}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Validates `yaml`; Err with the validator's report.
fn validate(name: &str, yaml: &str) -> Result<String, String> {
    let dir = std::env::temp_dir().join(format!("mesh-deploy-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("rendered.yaml");
    std::fs::write(&file, yaml).unwrap();
    let out =
        tool("kubernetes-validate").args(["--strict", "--kubernetes-version", KUBERNETES]).arg(&file).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        Ok(report)
    } else {
        Err(report)
    }
}

fn objects(yaml: &str) -> Vec<serde_yaml::Value> {
    serde_yaml::Deserializer::from_str(yaml).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect()
}

#[test]
fn deploy_renders_and_every_object_validates_against_the_kubernetes_schema() {
    let yaml = render("deploy");
    let report = validate("deploy", &yaml).unwrap_or_else(|r| panic!("deploy/ does not validate:\n{r}\n{yaml}"));
    let kinds: Vec<String> = objects(&yaml).iter().map(|o| o["kind"].as_str().unwrap_or_default().to_owned()).collect();
    for kind in
        ["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "DaemonSet", "Deployment", "Service"]
    {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} in deploy/: {kinds:?}");
    }
    assert_eq!(report.matches("passed").count(), kinds.len(), "{report}");

    let example = render("deploy/example");
    validate("example", &example).unwrap_or_else(|r| panic!("deploy/example does not validate:\n{r}"));
}

#[test]
fn the_validator_rejects_a_broken_daemonset() {
    // So that the test above cannot pass with a validator that checks nothing.
    let yaml = render("deploy").replace("  selector:\n    matchLabels:", "  selectr:\n    matchLabels:");
    let report = validate("broken", &yaml).expect_err("a DaemonSet without a selector validated");
    assert!(report.contains("daemonset/mesh-daemon"), "{report}");
}

#[test]
fn the_daemonset_gives_the_daemon_what_the_datapath_needs() {
    let yaml = render("deploy");
    let all = objects(&yaml);
    let ds = all.iter().find(|o| o["kind"] == "DaemonSet").expect("a DaemonSet");
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["hostPID"], true, "pods are found by their processes");
    // Rollout: the new pod starts next to the old one and takes its
    // listeners over; declared ports would become hostPorts and keep it
    // from being scheduled.
    assert_eq!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"], 1);
    assert_eq!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"], 0);
    let c = &spec["containers"][0];
    assert_eq!(c["securityContext"]["privileged"], true);
    let env = c["env"].as_sequence().unwrap();
    assert!(
        env.iter().any(|e| e["name"] == "NODE_NAME" && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"),
        "NODE_NAME from the downward API"
    );
    assert!(c["ports"].is_null(), "no ports: with hostNetwork they are hostPorts: {:?}", c["ports"]);
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], 15020, "liveness on the admin port");
    assert_eq!(c["livenessProbe"]["httpGet"]["host"], "127.0.0.1", "the admin port listens on loopback");
    // Readiness asks this container's daemon (the old pod's answers on the
    // same port until the handover): the probe command runs and refuses
    // while its --ready-file is missing.
    let probe: Vec<&str> =
        c["readinessProbe"]["exec"]["command"].as_sequence().unwrap().iter().filter_map(|a| a.as_str()).collect();
    assert_eq!(probe[..2], ["/usr/local/bin/mesh-daemon", "probe"], "{probe:?}");
    let args: Vec<&str> = c["args"].as_sequence().unwrap().iter().filter_map(|a| a.as_str()).collect();
    let file = args.iter().find_map(|a| a.strip_prefix("--ready-file=")).expect("--ready-file");
    assert!(probe.contains(&format!("--ready-file={file}").as_str()), "{probe:?} reads {file}");
    let bins = mesh_tests::cluster::Bins::locate().unwrap();
    let missing = std::env::temp_dir().join("mesh-no-such-ready-file");
    let out = Command::new(&bins.daemon)
        .args(probe[1..].iter().filter(|a| !a.starts_with("--ready-file=")))
        .arg(format!("--ready-file={}", missing.display()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("does not serve"), "{err}");
    assert!(c["resources"]["requests"].is_mapping() && c["resources"]["limits"].is_mapping());
    let mounts = c["volumeMounts"].as_sequence().unwrap();
    let mount =
        |path: &str| mounts.iter().find(|m| m["mountPath"] == path).unwrap_or_else(|| panic!("no mount at {path}"));
    assert_eq!(mount("/sys/fs/bpf")["mountPropagation"], "Bidirectional", "pins must reach the host");
    for path in ["/sys/fs/cgroup", "/run/mesh", "/var/lib/mesh"] {
        mount(path);
    }
    // Read-only RBAC on what discovery watches.
    let role = all.iter().find(|o| o["kind"] == "ClusterRole" && o["metadata"]["name"] == "mesh-daemon").unwrap();
    for rule in role["rules"].as_sequence().unwrap() {
        let verbs: Vec<&str> = rule["verbs"].as_sequence().unwrap().iter().filter_map(|v| v.as_str()).collect();
        assert_eq!(verbs, ["get", "list", "watch"], "{rule:?}");
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The value in `text` after `key` up to the first `stop` character.
fn after<'a>(text: &'a str, key: &str, stop: char) -> &'a str {
    let rest = &text[text.find(key).unwrap_or_else(|| panic!("no {key:?}")) + key.len()..];
    &rest[..rest.find(stop).unwrap_or(rest.len())]
}

#[test]
fn the_dockerfile_builds_what_the_workspace_builds_with_the_same_recipe() {
    // No container engine here: check the Dockerfile's steps against the
    // workspace instead of running them.
    let docker = read("deploy/Dockerfile");
    let workspace = read("Cargo.toml");
    let setup = read("xtask/src/setup.rs");
    // The stable toolchain is the workspace's rust-version.
    assert_eq!(after(&docker, "FROM rust:", '-'), after(&workspace, "rust-version = \"", '"'));
    // bpf-linker: the version setup installs, without default features,
    // against the nightly's LLVM; the nightly carries rust-src.
    assert_eq!(
        after(&docker, "ARG BPF_LINKER_VERSION=", '\n'),
        after(&setup, "const BPF_LINKER_VERSION: &str = \"", '"')
    );
    assert!(setup.contains("--no-default-features") && docker.contains("--no-default-features"));
    assert!(docker.contains("LLVM_PREFIX=") && docker.contains("--features \"llvm-$major\""));
    assert!(docker.contains("--component rust-src") && setup.contains("rust-src"));
    // The crate and binaries it builds and ships exist as such.
    let cli_manifest = read("mesh-cli/Cargo.toml");
    assert_eq!(after(&cli_manifest, "name = \"", '"'), "mesh-cli");
    // With the features of every xtask build (Kubernetes discovery on).
    let xtask = read("xtask/src/main.rs");
    let features = after(&xtask, "pub const FEATURES: &str = \"", '"');
    assert!(features.contains("mesh-cli/kubernetes"), "{features}");
    let build = format!("cargo build --release --locked -p mesh-cli --bins --features {features}");
    assert!(docker.contains(&build), "the image is not built with `{build}`");
    for (bin, path) in [("mesh-daemon", "src/main.rs"), ("meshctl", "src/bin/meshctl/main.rs")] {
        assert!(cli_manifest.contains(&format!("name = \"{bin}\"\npath = \"{path}\"")), "the {bin} binary");
        assert!(root().join("mesh-cli").join(path).exists(), "the {bin} binary");
    }
    let copy = docker.lines().find(|l| l.starts_with("COPY --from=build")).expect("a COPY of the binaries");
    for bin in ["mesh-daemon", "meshctl"] {
        assert!(copy.contains(&format!("/src/target/release/{bin} ")), "{bin} not shipped: {copy}");
    }
    // The image name the DaemonSet runs is the one kustomize sets.
    let ds = render("deploy");
    assert!(ds.contains("image: mesh-daemon:dev"), "{ds}");
}

#[test]
fn every_daemonset_flag_is_one_the_daemon_takes_and_its_files_are_mounted() {
    let yaml = render("deploy");
    let all = objects(&yaml);
    let ds = all.iter().find(|o| o["kind"] == "DaemonSet").unwrap();
    let spec = &ds["spec"]["template"]["spec"];
    let c = &spec["containers"][0];
    let args: Vec<&str> = c["args"].as_sequence().unwrap().iter().filter_map(|a| a.as_str()).collect();
    assert_eq!(args.first(), Some(&"run"));
    assert!(args.contains(&"--kubernetes"), "discovery on: {args:?}");
    let bins = mesh_tests::cluster::Bins::locate().unwrap();
    let out = Command::new(&bins.daemon).args(["run", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    // Options as help lists them: `  --flag <V>` or `  -s, --flag`, not a
    // mention in another option's text.
    let options: Vec<&str> = help
        .lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let l = if l.starts_with("--") { l } else { l.strip_prefix('-')?.split_once(", ")?.1 };
            l.split([' ', '=']).next()
        })
        .collect();
    assert!(options.contains(&"--node"), "{options:?}");
    for a in args.iter().filter(|a| a.starts_with("--")) {
        let flag = a.split('=').next().unwrap();
        assert!(options.contains(&flag), "{flag}: not an option of run --help:\n{help}");
    }
    // No CA key on a node: nothing of the DaemonSet names the CA Secret or
    // the CA flags; the daemon's credential is its projected token for the
    // issuer's audience, and its trust bundle the ConfigMap of the CA's
    // certificate.
    let ds_text = serde_yaml::to_string(ds).unwrap();
    assert!(
        !ds_text.contains("mesh-ca") && !ds_text.contains("ca.key"),
        "the DaemonSet touches the CA key:\n{ds_text}"
    );
    assert!(!args.iter().any(|a| a.starts_with("--ca-cert") || a.starts_with("--ca-key")), "{args:?}");
    let mounts = c["volumeMounts"].as_sequence().unwrap();
    let volumes = spec["volumes"].as_sequence().unwrap();
    let volume_of = |flag: &str| {
        let path = args.iter().find_map(|a| a.strip_prefix(flag)).unwrap_or_else(|| panic!("no {flag}"));
        let m = mounts
            .iter()
            .find(|m| path.starts_with(&format!("{}/", m["mountPath"].as_str().unwrap())))
            .unwrap_or_else(|| panic!("{flag}{path}: not under any mount"));
        let file = &path[m["mountPath"].as_str().unwrap().len() + 1..];
        (volumes.iter().find(|v| v["name"] == m["name"]).unwrap().clone(), file.to_owned())
    };
    let (trust, file) = volume_of("--trust-bundle=");
    assert_eq!((trust["configMap"]["name"].as_str(), file.as_str()), (Some("mesh-trust"), "ca.pem"));
    let (token, file) = volume_of("--issuer-token=");
    let sa_token = &token["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(sa_token["path"].as_str(), Some(file.as_str()), "{token:?}");
    let audience = sa_token["audience"].as_str().expect("a token bound to the issuer's audience");
    // The issuer: a Deployment that mounts the CA Secret, takes tokens for
    // that audience, and is reached at the Service the daemons name.
    let issuer = all.iter().find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == "mesh-issuer").unwrap();
    let ispec = &issuer["spec"]["template"]["spec"];
    let ic = &ispec["containers"][0];
    let iargs: Vec<&str> = ic["args"].as_sequence().unwrap().iter().filter_map(|a| a.as_str()).collect();
    assert_eq!(&iargs[..2], ["ca", "serve"]);
    assert!(iargs.contains(&"--kubernetes"), "{iargs:?}");
    let out = Command::new(&bins.daemon).args(["ca", "serve", "--help"]).output().unwrap();
    let ihelp = String::from_utf8_lossy(&out.stdout);
    for a in iargs.iter().filter(|a| a.starts_with("--")) {
        let flag = a.split('=').next().unwrap();
        assert!(ihelp.contains(&format!("  {flag}")), "{flag}: not an option of ca serve --help:\n{ihelp}");
    }
    let default_audience = ihelp.split("--audience").nth(1).and_then(|t| t.split("[default: ").nth(1)).unwrap();
    let issuer_audience = iargs
        .iter()
        .find_map(|a| a.strip_prefix("--audience="))
        .unwrap_or(&default_audience[..default_audience.find(']').unwrap()]);
    assert_eq!(issuer_audience, audience, "the daemons' tokens are for another audience than the issuer takes");
    let ca_volume = ispec["volumes"].as_sequence().unwrap().iter().find(|v| v["secret"]["secretName"] == "mesh-ca");
    let ca_volume = ca_volume.expect("the issuer mounts the CA Secret");
    let ca_mount = ic["volumeMounts"].as_sequence().unwrap().iter().find(|m| m["name"] == ca_volume["name"]).unwrap();
    for flag in ["--ca-cert=", "--ca-key="] {
        let path = iargs.iter().find_map(|a| a.strip_prefix(flag)).unwrap_or_else(|| panic!("issuer: no {flag}"));
        assert!(path.starts_with(ca_mount["mountPath"].as_str().unwrap()), "{flag}{path}");
    }
    let listen_port =
        iargs.iter().find_map(|a| a.strip_prefix("--listen=")).and_then(|l| l.rsplit(':').next()).unwrap();
    let svc = all.iter().find(|o| o["kind"] == "Service" && o["metadata"]["name"] == "mesh-issuer").unwrap();
    let port = &svc["spec"]["ports"][0];
    let target = ic["ports"].as_sequence().unwrap().iter().find(|p| p["name"] == port["targetPort"]).unwrap();
    assert_eq!(target["containerPort"].as_u64().map(|p| p.to_string()).as_deref(), Some(listen_port));
    assert_eq!(svc["spec"]["selector"], issuer["spec"]["selector"]["matchLabels"]);
    let want = format!(
        "{}.{}.svc:{}",
        svc["metadata"]["name"].as_str().unwrap(),
        svc["metadata"]["namespace"].as_str().unwrap(),
        port["port"].as_u64().unwrap()
    );
    assert!(args.contains(&format!("--issuer={want}").as_str()), "the daemons must ask {want}: {args:?}");
    assert_eq!(spec["dnsPolicy"], "ClusterFirstWithHostNet", "a host-network daemon resolves the Service name");
    assert!(issuer["spec"]["replicas"].as_u64() >= Some(2), "two replicas");
    // The issuer may review tokens and read pods and namespaces, and, as
    // the one writer of route status, read Services and routes and patch
    // the routes' status: nothing more.
    let role = all.iter().find(|o| o["kind"] == "ClusterRole" && o["metadata"]["name"] == "mesh-issuer").unwrap();
    let rules: Vec<(String, Vec<String>)> = role["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| {
            let list = |k: &str| {
                r[k].as_sequence().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect::<Vec<_>>()
            };
            (format!("{}/{}", list("apiGroups").join(","), list("resources").join(",")), list("verbs"))
        })
        .collect();
    let want_rules = [
        ("authentication.k8s.io/tokenreviews", vec!["create"]),
        ("/pods", vec!["get", "list"]),
        ("/namespaces", vec!["get"]),
        ("/services", vec!["list", "watch"]),
        ("gateway.networking.k8s.io/httproutes,grpcroutes,referencegrants", vec!["get", "list", "watch"]),
        ("gateway.networking.k8s.io/httproutes/status,grpcroutes/status", vec!["patch"]),
    ];
    let want_rules: Vec<(String, Vec<String>)> =
        want_rules.iter().map(|(r, v)| ((*r).to_owned(), v.iter().map(|s| (*s).to_owned()).collect())).collect();
    assert_eq!(rules, want_rules);
    // The drain fits in the grace period, or the kubelet cuts it short.
    let drain = args.iter().find_map(|a| a.strip_prefix("--drain-timeout=")).expect("--drain-timeout");
    let drain_s: u64 = drain.strip_suffix('s').and_then(|n| n.parse().ok()).expect("--drain-timeout in seconds");
    let grace = spec["terminationGracePeriodSeconds"].as_u64().expect("terminationGracePeriodSeconds");
    assert!(grace > drain_s, "terminationGracePeriodSeconds {grace} must exceed --drain-timeout {drain}");
    // bpffs is mounted on the node before the daemon starts.
    let init = &spec["initContainers"][0];
    let cmd = init["command"].as_sequence().unwrap().iter().filter_map(|a| a.as_str()).collect::<Vec<_>>().join(" ");
    assert!(cmd.contains("mount -t bpf bpf /sys/fs/bpf"), "{cmd}");
    assert_eq!(init["volumeMounts"][0]["mountPropagation"], "Bidirectional");
}
