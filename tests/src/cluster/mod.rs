//! Building and tearing down a mini cluster, and running things in it.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use anyhow::{bail, Context};

use crate::sys::{self, ip};

mod daemon;
mod exec;

pub use daemon::Daemon;

/// Admin port of every daemon, on the loopback of its node's netns.
pub const ADMIN_PORT: u16 = 15020;
pub const PROXY_PORT: u16 = 15001;

/// What to build: nodes and pods, and their address families.
#[derive(Debug, Clone, Default)]
pub struct ClusterSpec {
    nodes: Vec<String>,
    pods: Vec<PodSpec>,
    stack: Stack,
}

/// The address families of a cluster's nodes and pods.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Stack {
    #[default]
    Ipv4,
    /// Nodes and pods have an address of each family.
    Dual,
    /// IPv6 only: nodes and pods have no IPv4 address (their `address`
    /// and `ip` are 0.0.0.0).
    Ipv6,
}

impl Stack {
    fn v4(self) -> bool {
        self != Stack::Ipv6
    }
    fn v6(self) -> bool {
        self != Stack::Ipv4
    }
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
    /// node-a with `client` and `web-1`, node-b with `web-2`: a local and
    /// a remote endpoint for one client.
    pub fn client_and_two_webs() -> Self {
        Self::new().node("node-a").node("node-b").pod("client", "node-a").pod("web-1", "node-a").pod("web-2", "node-b")
    }
    pub fn node(mut self, name: &str) -> Self {
        self.nodes.push(name.to_owned());
        self
    }
    /// Nodes and pods of these families (IPv4 unless said).
    pub fn stack(mut self, stack: Stack) -> Self {
        self.stack = stack;
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
    /// Address on the fabric (0.0.0.0 in an IPv6-only cluster).
    pub address: Ipv4Addr,
    /// IPv6 address on the fabric, in a cluster with IPv6.
    pub address6: Option<Ipv6Addr>,
    pub netns: PathBuf,
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub node: String,
    /// 0.0.0.0 in an IPv6-only cluster.
    pub ip: Ipv4Addr,
    /// In a cluster with IPv6.
    pub ip6: Option<Ipv6Addr>,
    pub netns: PathBuf,
    pub cgroup: PathBuf,
    pub enrolled: bool,
}

impl Pod {
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.ip, port))
    }
    /// Its IPv6 address at `port` (the pod must have one).
    pub fn addr6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.ip6.expect("the pod has an IPv6 address")), port)
    }
    /// Its addresses as a workload lists them: `ip: a` or `ips: [a, b]`.
    fn ips_field(&self) -> String {
        match (self.ip.is_unspecified(), self.ip6) {
            (false, None) => format!("ip: {}", self.ip),
            (true, Some(v6)) => format!("ip: '{v6}'"),
            (_, Some(v6)) => format!("ips: [{}, '{v6}']", self.ip),
            (true, None) => unreachable!("a pod has an address"),
        }
    }
}

/// Paths of the binaries the harness runs.
#[derive(Debug, Clone)]
pub struct Bins {
    pub daemon: PathBuf,
    /// Another build of the daemon (`cargo xtask test` builds one without
    /// the kubernetes feature), for upgrade tests.
    pub daemon_variant: PathBuf,
    pub meshctl: PathBuf,
    pub mt_pod: PathBuf,
    pub mt_tunnel: PathBuf,
    pub mt_http: PathBuf,
    pub mt_grpc: PathBuf,
    pub mt_otlp: PathBuf,
}

impl Bins {
    /// The harness's own tools by name; anything else is looked up on PATH.
    fn program(&self, name: &str) -> PathBuf {
        match name {
            "mt-pod" => self.mt_pod.clone(),
            "mt-tunnel" => self.mt_tunnel.clone(),
            "mt-http" => self.mt_http.clone(),
            "mt-grpc" => self.mt_grpc.clone(),
            "mt-otlp" => self.mt_otlp.clone(),
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
            let b = Self {
                daemon: d.join("mesh-daemon"),
                daemon_variant: d.join("mesh-daemon-variant"),
                meshctl: d.join("meshctl"),
                mt_pod: d.join("mt-pod"),
                mt_tunnel: d.join("mt-tunnel"),
                mt_http: d.join("mt-http"),
                mt_grpc: d.join("mt-grpc"),
                mt_otlp: d.join("mt-otlp"),
            };
            let all = [&b.daemon, &b.meshctl, &b.mt_pod, &b.mt_tunnel, &b.mt_http, &b.mt_grpc, &b.mt_otlp];
            if all.iter().all(|p| p.exists()) {
                return Ok(b);
            }
        }
        bail!(
            "mesh-daemon, meshctl and the mt-* pod tools are not built next to this program (looked in {dirs:?}); \
             build them with `cargo build -p mesh-cli -p mesh-tests --bins` (cargo xtask test does) or set MESH_BIN_DIR"
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
        let stack = spec.stack;
        // IPv6 addresses are usable at once (no duplicate address
        // detection: every address here is unique by construction).
        let add6 = |ns: &str, addr: String, dev: &str| ip(&["-n", ns, "-6", "addr", "add", &addr, "dev", dev, "nodad"]);
        for (i, name) in spec.nodes.iter().enumerate() {
            let (ns, netns) = self.add_netns(&format!("n-{name}"))?;
            let address = if stack.v4() { Ipv4Addr::new(172, 18, 0, 2 + i as u8) } else { Ipv4Addr::UNSPECIFIED };
            let address6 = stack.v6().then(|| Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 2 + i as u16));
            let port = format!("n{i}");
            ip(&["-n", &fab, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            ip(&["-n", &fab, "link", "set", &port, "master", "br0", "up"])?;
            ip(&["-n", &ns, "link", "add", "cbr0", "type", "bridge"])?;
            let sysctl = |key: &str| {
                sys::run(Command::new("nsenter").arg(format!("--net={}", netns.display())).args(["sysctl", "-qw", key]))
            };
            if stack.v4() {
                ip(&["-n", &ns, "addr", "add", &format!("{address}/24"), "dev", "eth0"])?;
                ip(&["-n", &ns, "addr", "add", &format!("10.244.{}.1/24", i + 1), "dev", "cbr0"])?;
                sysctl("net.ipv4.ip_forward=1")?;
            }
            if let Some(a6) = address6 {
                add6(&ns, format!("{a6}/64"), "eth0")?;
                add6(&ns, format!("fd00:244:{}::1/64", i + 1), "cbr0")?;
                sysctl("net.ipv6.conf.all.forwarding=1")?;
            }
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "cbr0", "up"])?;
            let cgroup = self.cgroup.join(name);
            std::fs::create_dir(&cgroup)?;
            std::fs::create_dir(cgroup.join("mesh-daemon"))?;
            let pin_dir = self.pin_root.join(name);
            self.nodes.push(Node { name: name.clone(), address, address6, netns, cgroup, pin_dir });
        }
        // Each node routes the other nodes' pod ranges over the fabric.
        for a in 0..self.nodes.len() {
            for b in (0..self.nodes.len()).filter(|b| *b != a) {
                let ns = format!("{}-n-{}", self.prefix, self.nodes[a].name);
                if stack.v4() {
                    let via = self.nodes[b].address.to_string();
                    ip(&["-n", &ns, "route", "add", &format!("10.244.{}.0/24", b + 1), "via", &via])?;
                }
                if let Some(via) = self.nodes[b].address6 {
                    let range = format!("fd00:244:{}::/64", b + 1);
                    ip(&["-n", &ns, "-6", "route", "add", &range, "via", &via.to_string()])?;
                }
            }
        }
        for (k, PodSpec { name, node, enrolled, cgroup: cgroup_name }) in spec.pods.iter().enumerate() {
            let Some(i) = self.nodes.iter().position(|n| &n.name == node) else {
                bail!("pod {name}: no node {node} in the spec");
            };
            let host = 2 + self.pods.iter().filter(|p| &p.node == node).count() as u8;
            let ip_addr = if stack.v4() { Ipv4Addr::new(10, 244, i as u8 + 1, host) } else { Ipv4Addr::UNSPECIFIED };
            let ip6 = stack.v6().then(|| Ipv6Addr::new(0xfd00, 0x244, i as u16 + 1, 0, 0, 0, 0, u16::from(host)));
            let (ns, netns) = self.add_netns(&format!("p-{name}"))?;
            let node_ns = format!("{}-n-{node}", self.prefix);
            let port = format!("p{k}");
            ip(&["-n", &node_ns, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            ip(&["-n", &node_ns, "link", "set", &port, "master", "cbr0", "up"])?;
            if stack.v4() {
                ip(&["-n", &ns, "addr", "add", &format!("{ip_addr}/24"), "dev", "eth0"])?;
            }
            if let Some(v6) = ip6 {
                add6(&ns, format!("{v6}/64"), "eth0")?;
            }
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            if stack.v4() {
                ip(&["-n", &ns, "route", "add", "default", "via", &format!("10.244.{}.1", i + 1)])?;
            }
            if ip6.is_some() {
                ip(&["-n", &ns, "-6", "route", "add", "default", "via", &format!("fd00:244:{}::1", i + 1)])?;
            }
            let cgroup = self.nodes[i].cgroup.join(cgroup_name);
            std::fs::create_dir(&cgroup)?;
            self.pods.push(Pod {
                name: name.clone(),
                node: node.clone(),
                ip: ip_addr,
                ip6,
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
            let addresses = match (n.address.is_unspecified(), n.address6) {
                (_, None) => format!("address: {}", n.address),
                (true, Some(v6)) => format!("address: '{v6}'"),
                (false, Some(v6)) => format!("addresses: [{}, '{v6}']", n.address),
            };
            let _ = writeln!(s, "  - {{ name: {}, {addresses} }}", n.name);
        }
        s.push_str("workloads:\n");
        for p in self.pods.iter().filter(|p| p.enrolled) {
            let _ = writeln!(
                s,
                "  - {{ name: {0}, namespace: default, serviceAccount: {0}, node: {1}, {2}, netns: {3} }}",
                p.name,
                p.node,
                p.ips_field(),
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

    /// The daemon flags that hand it only the trust bundle (its
    /// certificates then come from an issuer).
    fn trust_flags(&self) -> anyhow::Result<Vec<std::ffi::OsString>> {
        Ok(vec!["--trust-bundle".into(), self.ca_dir()?.join("ca.pem").into()])
    }

    /// A credential for `node` from `mesh-daemon ca bootstrap`, recorded in
    /// this run's issuer credentials file: the token file's path.
    pub fn bootstrap_node(&self, node: &str) -> anyhow::Result<PathBuf> {
        let out = self.dir.join(format!("{node}.token"));
        sys::run(
            Command::new(&self.bins.daemon)
                .args(["ca", "bootstrap", "--credentials"])
                .arg(self.dir.join("credentials.json"))
                .args(["--node", node, "--out"])
                .arg(&out),
        )?;
        Ok(out)
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
