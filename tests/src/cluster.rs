//! Building and tearing down a mini cluster, and running things in it.

use std::fmt::Write as _;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};

use crate::sys::{self, ip};

/// Admin port of every daemon, on the loopback of its node's netns.
pub const ADMIN_PORT: u16 = 15020;
pub const PROXY_PORT: u16 = 15001;

/// What to build: nodes and pods.
#[derive(Debug, Clone, Default)]
pub struct ClusterSpec {
    nodes: Vec<String>,
    pods: Vec<PodSpec>,
}

#[derive(Debug, Clone)]
struct PodSpec {
    name: String,
    node: String,
    enrolled: bool,
    /// The pod's cgroup folder under its node's.
    cgroup: String,
}

impl ClusterSpec {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn node(mut self, name: &str) -> Self {
        self.nodes.push(name.to_owned());
        self
    }
    /// A pod enrolled in the mesh (listed as a workload in [`Cluster::config`]).
    pub fn pod(self, name: &str, node: &str) -> Self {
        self.add_pod(name, node, true, name)
    }
    /// A pod as the kubelet makes one: its cgroup is `pod<uid>` (the
    /// cgroupfs driver's name), so discovery finds its processes by UID.
    /// Not listed in [`Cluster::config`]; discovery enrolls it.
    pub fn kube_pod(self, name: &str, node: &str, uid: &str) -> Self {
        self.add_pod(name, node, false, &format!("pod{uid}"))
    }
    /// A pod that is not enrolled.
    pub fn plain_pod(self, name: &str, node: &str) -> Self {
        self.add_pod(name, node, false, name)
    }
    fn add_pod(mut self, name: &str, node: &str, enrolled: bool, cgroup: &str) -> Self {
        self.pods.push(PodSpec { name: name.into(), node: node.into(), enrolled, cgroup: cgroup.into() });
        self
    }
}

#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    /// Address on the fabric.
    pub address: Ipv4Addr,
    pub netns: PathBuf,
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub node: String,
    pub ip: Ipv4Addr,
    pub netns: PathBuf,
    pub cgroup: PathBuf,
    pub enrolled: bool,
}

impl Pod {
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.ip, port))
    }
}

/// Paths of the binaries the harness runs.
#[derive(Debug, Clone)]
pub struct Bins {
    pub daemon: PathBuf,
    pub meshctl: PathBuf,
    pub mt_pod: PathBuf,
    pub mt_tunnel: PathBuf,
}

impl Bins {
    /// The harness's own tools by name; anything else is looked up on PATH.
    fn program(&self, name: &str) -> PathBuf {
        match name {
            "mt-pod" => self.mt_pod.clone(),
            "mt-tunnel" => self.mt_tunnel.clone(),
            other => PathBuf::from(other),
        }
    }

    /// `MESH_BIN_DIR`, or the cargo target folder this program runs from.
    pub fn locate() -> anyhow::Result<Self> {
        let dirs: Vec<PathBuf> = match std::env::var_os("MESH_BIN_DIR") {
            Some(d) => vec![PathBuf::from(d)],
            None => {
                let exe = std::env::current_exe()?;
                exe.ancestors().skip(1).take(2).map(Path::to_path_buf).collect()
            }
        };
        for d in &dirs {
            let (daemon, meshctl, mt_pod, mt_tunnel) =
                (d.join("mesh-daemon"), d.join("meshctl"), d.join("mt-pod"), d.join("mt-tunnel"));
            if daemon.exists() && meshctl.exists() && mt_pod.exists() && mt_tunnel.exists() {
                return Ok(Self { daemon, meshctl, mt_pod, mt_tunnel });
            }
        }
        bail!(
            "mesh-daemon, meshctl, mt-pod and mt-tunnel are not built next to this program (looked in {dirs:?}); \
             build them with `cargo build -p mesh-daemon -p mesh-tests --bins` (cargo xtask test does) or set MESH_BIN_DIR"
        )
    }
}

static SEQ: AtomicU32 = AtomicU32::new(0);

fn unique_prefix() -> String {
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let x = (std::process::id().wrapping_mul(2_654_435_761)) ^ nanos ^ seq.wrapping_mul(0x9E37_79B9);
    format!("mt{:06x}", x & 0xff_ffff)
}

pub struct Cluster {
    pub prefix: String,
    /// Configs and logs of this run.
    pub dir: PathBuf,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    pub bins: Bins,
    cgroup: PathBuf,
    pin_root: PathBuf,
    netns: Vec<String>,
    procs: Mutex<Vec<Child>>,
    /// (pod, pid) of every process started with [`Cluster::spawn`].
    spawned_pods: Mutex<Vec<(String, u32)>>,
    ca_lock: Mutex<()>,
}

impl Cluster {
    pub fn create(spec: &ClusterSpec) -> anyhow::Result<Self> {
        sys::require_root()?;
        sys::ensure_bpffs()?;
        let bins = Bins::locate()?;
        let prefix = unique_prefix();
        let dir = std::env::temp_dir().join(&prefix);
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let cgroup = sys::cgroup2_root()?.join(&prefix);
        std::fs::create_dir(&cgroup).with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        let mut c = Cluster {
            pin_root: PathBuf::from("/sys/fs/bpf").join(&prefix),
            prefix,
            dir,
            nodes: Vec::new(),
            pods: Vec::new(),
            bins,
            cgroup,
            netns: Vec::new(),
            procs: Mutex::new(Vec::new()),
            spawned_pods: Mutex::new(Vec::new()),
            ca_lock: Mutex::new(()),
        };
        // On error, drop tears down whatever was made so far.
        c.build(spec)?;
        Ok(c)
    }

    fn add_netns(&mut self, suffix: &str) -> anyhow::Result<(String, PathBuf)> {
        let name = format!("{}-{suffix}", self.prefix);
        ip(&["netns", "add", &name])?;
        self.netns.push(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        Ok((name.clone(), PathBuf::from("/var/run/netns").join(&name)))
    }

    fn build(&mut self, spec: &ClusterSpec) -> anyhow::Result<()> {
        let (fab, _) = self.add_netns("fab")?;
        ip(&["-n", &fab, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &fab, "link", "set", "br0", "up"])?;
        for (i, name) in spec.nodes.iter().enumerate() {
            let (ns, netns) = self.add_netns(&format!("n-{name}"))?;
            let address = Ipv4Addr::new(172, 18, 0, 2 + i as u8);
            let port = format!("n{i}");
            ip(&["-n", &fab, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            ip(&["-n", &fab, "link", "set", &port, "master", "br0", "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{address}/24"), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "add", "cbr0", "type", "bridge"])?;
            ip(&["-n", &ns, "addr", "add", &format!("10.244.{}.1/24", i + 1), "dev", "cbr0"])?;
            ip(&["-n", &ns, "link", "set", "cbr0", "up"])?;
            sys::run(Command::new("nsenter").arg(format!("--net={}", netns.display())).args([
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ]))?;
            let cgroup = self.cgroup.join(name);
            std::fs::create_dir(&cgroup)?;
            std::fs::create_dir(cgroup.join("mesh-daemon"))?;
            self.nodes.push(Node { name: name.clone(), address, netns, cgroup, pin_dir: self.pin_root.join(name) });
        }
        // Each node routes the other nodes' pod ranges over the fabric.
        for a in 0..self.nodes.len() {
            for b in (0..self.nodes.len()).filter(|b| *b != a) {
                let ns = format!("{}-n-{}", self.prefix, self.nodes[a].name);
                let via = self.nodes[b].address.to_string();
                ip(&["-n", &ns, "route", "add", &format!("10.244.{}.0/24", b + 1), "via", &via])?;
            }
        }
        for (k, PodSpec { name, node, enrolled, cgroup: cgroup_name }) in spec.pods.iter().enumerate() {
            let Some(i) = self.nodes.iter().position(|n| &n.name == node) else {
                bail!("pod {name}: no node {node} in the spec");
            };
            let host = 2 + self.pods.iter().filter(|p| &p.node == node).count() as u8;
            let ip_addr = Ipv4Addr::new(10, 244, i as u8 + 1, host);
            let (ns, netns) = self.add_netns(&format!("p-{name}"))?;
            let node_ns = format!("{}-n-{node}", self.prefix);
            let port = format!("p{k}");
            ip(&["-n", &node_ns, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            ip(&["-n", &node_ns, "link", "set", &port, "master", "cbr0", "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{ip_addr}/24"), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "route", "add", "default", "via", &format!("10.244.{}.1", i + 1)])?;
            let cgroup = self.nodes[i].cgroup.join(cgroup_name);
            std::fs::create_dir(&cgroup)?;
            self.pods.push(Pod {
                name: name.clone(),
                node: node.clone(),
                ip: ip_addr,
                netns,
                cgroup,
                enrolled: *enrolled,
            });
        }
        Ok(())
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes.iter().find(|n| n.name == name).unwrap_or_else(|| panic!("no node {name}"))
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// A config document: the nodes, the enrolled pods as workloads, and
    /// `services` (YAML list items, indented by two spaces) under `services:`.
    pub fn config(&self, services: &str) -> String {
        let mut s = String::from("nodes:\n");
        for n in &self.nodes {
            let _ = writeln!(s, "  - {{ name: {}, address: {} }}", n.name, n.address);
        }
        s.push_str("workloads:\n");
        for p in self.pods.iter().filter(|p| p.enrolled) {
            let _ = writeln!(
                s,
                "  - {{ name: {0}, namespace: default, serviceAccount: {0}, node: {1}, ip: {2}, netns: {3} }}",
                p.name,
                p.node,
                p.ip,
                p.netns.display()
            );
        }
        s.push_str("services:\n");
        s.push_str(services);
        s
    }

    /// Writes `text` to a file of this run and returns its path.
    pub fn write_file(&self, name: &str, text: &str) -> anyhow::Result<PathBuf> {
        let p = self.dir.join(name);
        std::fs::write(&p, text)?;
        Ok(p)
    }

    /// This run's mesh CA (made on first use with `mesh-daemon ca init`):
    /// its folder, holding ca.pem and ca.key.
    pub fn ca_dir(&self) -> anyhow::Result<PathBuf> {
        let dir = self.dir.join("ca");
        let _once = self.ca_lock.lock().map_err(|_| anyhow::anyhow!("CA lock poisoned"))?;
        if !dir.join("ca.key").exists() {
            sys::run(Command::new(&self.bins.daemon).args(["ca", "init", "--out"]).arg(&dir))?;
        }
        Ok(dir)
    }

    /// Issues a certificate for SPIFFE ID `id` from the CA in `ca` (a
    /// folder with ca.pem and ca.key), valid for `seconds`, into a folder
    /// `name` of this run (cert.pem, key.pem), and returns that folder.
    pub fn issue_cert(&self, ca: &Path, id: &str, seconds: u64, name: &str) -> anyhow::Result<PathBuf> {
        let out = self.dir.join(name);
        sys::run(
            Command::new(&self.bins.daemon)
                .args(["ca", "issue", "--ca-cert"])
                .arg(ca.join("ca.pem"))
                .arg("--ca-key")
                .arg(ca.join("ca.key"))
                .args(["--id", id, "--seconds", &seconds.to_string(), "--out"])
                .arg(&out),
        )?;
        Ok(out)
    }

    /// The daemon flags that hand it this run's CA.
    fn ca_flags(&self) -> anyhow::Result<Vec<std::ffi::OsString>> {
        let ca = self.ca_dir()?;
        let (cert, key) = (ca.join("ca.pem"), ca.join("ca.key"));
        Ok(vec![
            "--trust-bundle".into(),
            cert.clone().into(),
            "--ca-cert".into(),
            cert.into(),
            "--ca-key".into(),
            key.into(),
        ])
    }

    /// The fabric's network namespace (the wire between nodes).
    pub fn fabric_netns(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(format!("{}-fab", self.prefix))
    }

    /// Where the daemon of `node` saves its state.
    pub fn state_dir(&self, node: &str) -> PathBuf {
        self.dir.join(format!("state-{node}"))
    }

    /// The control API socket of the daemon of `node`.
    pub fn api_socket(&self, node: &str) -> PathBuf {
        self.dir.join(format!("api-{node}.sock"))
    }

    /// Starts mesh-daemon for `node` with its own cgroup, pin dir, state
    /// dir, API socket and netns, and waits until it reports ready.
    pub fn start_daemon(&self, node: &str, config: &Path, extra: &[&str]) -> anyhow::Result<Daemon> {
        self.start_daemon_with(node, Some(config), extra, &[])
    }

    /// [`Cluster::start_daemon`] with an optional config and more
    /// environment (e.g. KUBECONFIG).
    pub fn start_daemon_with(
        &self,
        node: &str,
        config: Option<&Path>,
        extra: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> anyhow::Result<Daemon> {
        self.launch_daemon(node, config, extra, env, "/ready")
    }

    /// Starts mesh-daemon for `node` like [`Cluster::start_daemon`], but
    /// waits only until it is live: for a daemon expected not to be ready.
    pub fn start_daemon_live(&self, node: &str, extra: &[&str]) -> anyhow::Result<Daemon> {
        self.launch_daemon(node, None, extra, &[], "/live")
    }

    fn launch_daemon(
        &self,
        node: &str,
        config: Option<&Path>,
        extra: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
        wait_for: &str,
    ) -> anyhow::Result<Daemon> {
        let n = self.node(node).clone();
        let log_path = self.dir.join(format!("daemon-{node}.log"));
        let log = File::options().create(true).append(true).open(&log_path)?;
        let mut cmd = Command::new(&self.bins.daemon);
        cmd.arg("run");
        if let Some(config) = config {
            cmd.arg("--config").arg(config);
        }
        cmd.args(["--node", node])
            .arg("--cgroup")
            .arg(&n.cgroup)
            .arg("--pin-dir")
            .arg(&n.pin_dir)
            .arg("--state-dir")
            .arg(self.state_dir(node))
            .arg("--api-socket")
            .arg(self.api_socket(node))
            .args(self.ca_flags()?)
            .args(extra)
            .env("RUST_LOG", std::env::var("MESH_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        cmd.envs(env.iter().copied());
        sys::enter(&mut cmd, &n.cgroup.join("mesh-daemon"), &n.netns)?;
        let child = cmd.spawn().context("starting mesh-daemon")?;
        let mut d = Daemon { child: Some(child), node: n, log: log_path };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = d.try_wait() {
                bail!("mesh-daemon for {node} exited with {status} before it was ready:\n{}", d.log_text());
            }
            if matches!(d.admin_get(wait_for), Ok((200, _))) {
                return Ok(d);
            }
            if Instant::now() > deadline {
                bail!("mesh-daemon for {node} not ready after 30 s:\n{}", d.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pod_command(&self, pod: &str, program: &Path, args: &[&str]) -> anyhow::Result<Command> {
        let p = self.pod(pod);
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null());
        sys::enter(&mut cmd, &p.cgroup, &p.netns)?;
        Ok(cmd)
    }

    /// Starts a long-running process in `pod`; it is ended at teardown.
    pub fn spawn(&self, pod: &str, program: &Path, args: &[&str]) -> anyhow::Result<u32> {
        let log = File::options().create(true).append(true).open(self.dir.join(format!("pod-{pod}.log")))?;
        let mut cmd = self.pod_command(pod, program, args)?;
        cmd.stdout(log.try_clone()?).stderr(log);
        let child = cmd.spawn().with_context(|| format!("starting {} in pod {pod}", program.display()))?;
        let pid = child.id();
        self.procs.lock().map_err(|_| anyhow::anyhow!("process list poisoned"))?.push(child);
        self.spawned_pods.lock().map_err(|_| anyhow::anyhow!("process list poisoned"))?.push((pod.to_owned(), pid));
        Ok(pid)
    }

    /// Starts a long-running process in `node`'s network namespace (beside
    /// the daemon, like a node proxy would run); ended at teardown.
    pub fn spawn_on_node(&self, node: &str, program: &str, args: &[&str]) -> anyhow::Result<u32> {
        let n = self.node(node).clone();
        let cgroup = n.cgroup.join("extra");
        std::fs::create_dir_all(&cgroup)?;
        let log = File::options().create(true).append(true).open(self.dir.join(format!("node-{node}.log")))?;
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        sys::enter(&mut cmd, &cgroup, &n.netns)?;
        let child = cmd.spawn().with_context(|| format!("starting {program} on node {node}"))?;
        let pid = child.id();
        self.procs.lock().map_err(|_| anyhow::anyhow!("process list poisoned"))?.push(child);
        Ok(pid)
    }

    /// Stops a process started with [`Cluster::spawn`] with SIGTERM (a
    /// graceful stop) and waits up to 10 s for it to exit.
    pub fn terminate(&self, pid: u32) -> anyhow::Result<()> {
        let mut procs = self.procs.lock().map_err(|_| anyhow::anyhow!("process list poisoned"))?;
        let i = procs.iter().position(|c| c.id() == pid).context("no such process of this cluster")?;
        let mut c = procs.remove(i);
        sys::signal(pid, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                bail!("process {pid} did not exit within 10 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Starts a client in `pod` whose output the caller collects with
    /// `wait_with_output` (teardown kills it if the caller does not).
    pub fn start(&self, pod: &str, program: &str, args: &[&str]) -> anyhow::Result<Child> {
        let program = self.bins.program(program);
        let mut cmd = self.pod_command(pod, &program, args)?;
        Ok(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?)
    }

    /// The pid of the newest process started with [`Cluster::spawn`] in `pod`.
    pub fn spawned_pid_of(&self, pod: &str) -> Option<u32> {
        let pods = self.spawned_pods.lock().ok()?;
        pods.iter().rev().find(|(p, _)| p == pod).map(|(_, pid)| *pid)
    }

    /// Ends a process started with [`Cluster::spawn`].
    pub fn kill(&self, pid: u32) {
        if let Ok(mut procs) = self.procs.lock() {
            if let Some(i) = procs.iter().position(|c| c.id() == pid) {
                let mut c = procs.remove(i);
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Starts `mt-pod serve` in `pod` (HTTP on `http`, echo on `echo`) and
    /// waits until it accepts.
    pub fn serve(&self, pod: &str, http: u16, echo: Option<u16>) -> anyhow::Result<u32> {
        self.serve_with(pod, http, echo, &[])
    }

    /// [`Cluster::serve`] with more `mt-pod serve` flags (e.g. `--delay-ms`).
    pub fn serve_with(&self, pod: &str, http: u16, echo: Option<u16>, extra: &[&str]) -> anyhow::Result<u32> {
        let (h, e) = (http.to_string(), echo.map(|e| e.to_string()));
        let mut args = vec!["serve", "--name", pod, "--http", &h];
        if let Some(e) = &e {
            args.extend(["--echo", e.as_str()]);
        }
        args.extend(extra);
        let pid = self.spawn(pod, &self.bins.mt_pod.clone(), &args)?;
        let p = self.pod(pod);
        let ports = [Some(http), echo];
        for port in ports.iter().flatten() {
            if !sys::wait_until(Duration::from_secs(10), || sys::can_connect(&p.netns, p.addr(*port))) {
                bail!("server in pod {pod} does not accept on port {port}");
            }
        }
        Ok(pid)
    }

    /// Runs a command in `pod` to completion (killed after `timeout`).
    pub fn exec(&self, pod: &str, program: &str, args: &[&str], timeout: Duration) -> anyhow::Result<Output> {
        let program = self.bins.program(program);
        let mut cmd = self.pod_command(pod, &program, args)?;
        let child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {program:?} in pod {pod}"))?;
        let pid = child.id();
        let deadline = Instant::now() + timeout;
        let waited = std::thread::spawn(move || child.wait_with_output());
        while !waited.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !waited.is_finished() {
            sys::signal(pid, libc::SIGKILL);
        }
        let out = waited.join().map_err(|_| anyhow::anyhow!("wait thread panicked"))??;
        Ok(out)
    }

    /// `meshctl --socket <node's API socket> ARGS`, as root, from the host.
    pub fn meshctl(&self, node: &str, args: &[&str]) -> anyhow::Result<Output> {
        self.meshctl_as(node, None, args)
    }

    /// `meshctl` as another user (uid, gid).
    pub fn meshctl_as(&self, node: &str, user: Option<(u32, u32)>, args: &[&str]) -> anyhow::Result<Output> {
        // Another user may not reach the build folder (a clone under a 0700
        // folder): run a copy from this run's folder, which is 0755.
        let program = match user {
            Some(_) => {
                let copy = self.dir.join("meshctl");
                if !copy.exists() {
                    // Written under another name and renamed, so no open
                    // writable fd (inherited by a concurrent fork) makes
                    // the exec fail with ETXTBSY.
                    let tmp = self.dir.join("meshctl.tmp");
                    std::fs::copy(&self.bins.meshctl, &tmp)?;
                    std::fs::rename(&tmp, &copy)?;
                }
                copy
            }
            None => self.bins.meshctl.clone(),
        };
        let mut cmd = Command::new(program);
        cmd.arg("--socket").arg(self.api_socket(node)).args(args).stdin(Stdio::null());
        if let Some((uid, gid)) = user {
            std::os::unix::process::CommandExt::uid(&mut cmd, uid);
            std::os::unix::process::CommandExt::gid(&mut cmd, gid);
            // As root, std also drops the supplementary groups.
        }
        // A fork in another thread may still hold the copy open for a moment.
        for _ in 0..20 {
            match cmd.output() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => std::thread::sleep(Duration::from_millis(50)),
                other => return Ok(other?),
            }
        }
        Ok(cmd.output()?)
    }

    /// `curl` in `pod`; returns (exit code, stdout).
    pub fn curl(&self, pod: &str, url: &str) -> anyhow::Result<(i32, String)> {
        let out = self.exec(pod, "curl", &["-sS", "--max-time", "5", url], Duration::from_secs(10))?;
        Ok((out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned()))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Ok(mut procs) = self.procs.lock() {
            for c in procs.iter_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
            procs.clear();
        }
        sys::remove_cgroup_tree(&self.cgroup);
        for ns in self.netns.iter().rev() {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = std::fs::remove_dir_all(&self.pin_root);
        if std::thread::panicking() || std::env::var_os("MESH_KEEP_LOGS").is_some() {
            eprintln!("mini cluster {}: logs kept in {}", self.prefix, self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A running mesh-daemon of one node.
pub struct Daemon {
    child: Option<Child>,
    pub node: Node,
    pub log: PathBuf,
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log once `what` occurs in it `count` times, waiting up to 5 s
    /// (the daemon writes its log in batches, a little after the event).
    pub fn log_with(&self, what: &str, count: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = self.log_text();
            if log.matches(what).count() >= count || Instant::now() > deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET on the admin endpoint: (status, body).
    pub fn admin_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        sys::http_get(&self.node.netns, SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT)), path)
    }

    /// `/stats` as JSON.
    pub fn stats(&self) -> anyhow::Result<serde_json::Value> {
        let (status, body) = self.admin_get("/stats")?;
        if status != 200 {
            bail!("/stats answered {status}: {body}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// One counter from `/stats`, e.g. `("proxy", "forwarded")`.
    pub fn counter(&self, group: &str, name: &str) -> anyhow::Result<u64> {
        let s = self.stats()?;
        s[group][name].as_u64().with_context(|| format!("no counter {group}.{name} in {s}"))
    }

    /// SIGKILL: the daemon gets no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits up to 15 s for the exit.
    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        self.stop_with(libc::SIGTERM)
    }

    /// Sends `sig`, then waits up to 15 s for the exit.
    pub fn stop_with(&mut self, sig: i32) -> anyhow::Result<ExitStatus> {
        self.signal(sig)?;
        self.wait_exit(Duration::from_secs(15))
    }

    /// Sends `sig` and returns at once.
    pub fn signal(&self, sig: i32) -> anyhow::Result<()> {
        let Some(c) = self.child.as_ref() else { bail!("daemon already stopped") };
        sys::signal(c.id(), sig);
        Ok(())
    }

    /// Waits up to `timeout` for the daemon to exit (then kills it and fails).
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let Some(mut c) = self.child.take() else { bail!("daemon already stopped") };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = c.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                bail!("mesh-daemon did not exit within {timeout:?}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

/// Whether `name` is a run prefix this harness makes: `mt` + 6 hex digits.
fn is_prefix(name: &str) -> bool {
    name.len() == 8
        && name.starts_with("mt")
        && name[2..].bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Removes what crashed runs left behind: network namespaces, cgroups (and
/// the processes in them, which only the harness starts), pins and logs
/// whose names carry a run prefix. Returns what was removed.
pub fn clean_leftovers() -> anyhow::Result<Vec<String>> {
    sys::require_root()?;
    let mut removed = Vec::new();
    let list = sys::run(Command::new("ip").args(["netns", "list"]))?;
    for line in String::from_utf8_lossy(&list.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if name.split_once('-').is_some_and(|(p, _)| is_prefix(p)) {
            ip(&["netns", "del", name])?;
            removed.push(format!("netns {name}"));
        }
    }
    let roots =
        [(sys::cgroup2_root()?, "cgroup"), (PathBuf::from("/sys/fs/bpf"), "pins"), (std::env::temp_dir(), "logs")];
    for (root, what) in roots {
        let Ok(entries) = std::fs::read_dir(&root) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !is_prefix(&name) || !e.path().is_dir() {
                continue;
            }
            if what == "cgroup" {
                sys::remove_cgroup_tree(&e.path());
            } else {
                std::fs::remove_dir_all(e.path())?;
            }
            removed.push(format!("{what} {}", e.path().display()));
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    #[test]
    fn prefixes() {
        assert!(super::is_prefix("mt0a1b2c"));
        for bad in ["mt0a1b2", "mtx01234", "mt0A1B2C", "ab012345", "mt0a1b2cd"] {
            assert!(!super::is_prefix(bad), "{bad}");
        }
        for _ in 0..50 {
            assert!(super::is_prefix(&super::unique_prefix()));
        }
    }
}
