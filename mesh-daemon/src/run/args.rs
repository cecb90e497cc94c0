//! `mesh-daemon run`'s flags and their parsers.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::model::Invalid;

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Seeds the state when none is saved in --state-dir (YAML or JSON).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Which node this daemon runs on.
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    pub node: String,
    /// Where the accepted state is saved and restored from.
    #[arg(long, default_value = "/var/lib/mesh", value_name = "DIR")]
    pub state_dir: PathBuf,
    /// The control API's Unix socket.
    #[arg(long, default_value = "/run/mesh/mesh.sock", value_name = "PATH")]
    pub api_socket: PathBuf,
    /// Group whose members may use the control API (besides root).
    #[arg(long, value_name = "GROUP")]
    pub api_group: Option<String>,
    /// cgroup2 directory to attach the programs to [default: the cgroup2 root,
    /// from /proc/self/mountinfo].
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// Where maps and links are pinned [default: /sys/fs/bpf/mesh/<node>].
    #[arg(long, value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,
    /// Outbound listener, the target of redirected connections: one
    /// address per family, one port (repeat the flag for both). 0.0.0.0
    /// with no IPv6 address given listens on [::] at the same port too
    /// (when the host has IPv6). With an unspecified IP, pods are sent to
    /// the node's address of their connection's family from the state.
    #[arg(long, default_value = "0.0.0.0:15001", value_name = "ADDR")]
    pub proxy_listen: Vec<SocketAddr>,
    /// Admin HTTP endpoint (/live, /ready, /stats, /metrics, /config_dump).
    #[arg(long, default_value = "127.0.0.1:15020", value_name = "ADDR")]
    pub admin_listen: SocketAddr,
    /// A listener for Prometheus serving only /metrics, /live and /ready
    /// (never the state or the counters' JSON), e.g. on the node's address
    /// where the admin endpoint stays on loopback. Off when not given.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// The most slots a kernel-mode service table gets (1 to 4096): tables
    /// are as small as their weights allow, up to this.
    #[arg(long, default_value_t = crate::model::DEFAULT_SLOT_TABLE_SIZE, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub slot_table_size: u32,
    /// Entries of the kernel's slot map, shared by every kernel-mode table
    /// (kernel memory is taken per entry in use, about 120 bytes each).
    /// Taken when the map is created; a map pinned by an earlier daemon
    /// keeps its size.
    #[arg(long, default_value_t = crate::model::DEFAULT_SLOT_ENTRIES, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=16_777_216))]
    pub slot_entries: u32,
    /// Time constant of the peak-EWMA of connect time (e.g. 10s).
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = duration)]
    pub ewma_decay: std::time::Duration,
    /// Connect time assumed for an endpoint not measured yet.
    #[arg(long, default_value = "30ms", value_name = "DURATION", value_parser = duration)]
    pub default_rtt: std::time::Duration,
    /// Consecutive connect failures or resets that eject an endpoint.
    #[arg(long, default_value_t = 3, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100))]
    pub breaker_failures: u32,
    /// Worker threads of the proxy's runtime (0: one per CPU).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub worker_threads: usize,
    /// Trust domain of the SPIFFE identities.
    #[arg(long, default_value = "cluster.local", value_name = "DOMAIN")]
    pub trust_domain: String,
    /// PEM CA certificates that tunnel peers must chain to.
    #[arg(long, value_name = "FILE")]
    pub trust_bundle: Option<PathBuf>,
    /// The issuer (`mesh-daemon ca serve`) this daemon gets its node's and
    /// its workloads' certificates from, by CSR; no CA key on the node.
    /// Its certificate must chain to --trust-bundle. Repeat it for
    /// replicas: one that cannot be reached is passed over.
    #[arg(
        long,
        value_name = "HOST:PORT",
        value_parser = crate::identity::issuer::host_port,
        requires_all = ["issuer_token", "trust_bundle"],
        conflicts_with = "ca_key"
    )]
    pub issuer: Vec<String>,
    /// This node's credential for the issuer, read at every request: a
    /// token from `mesh-daemon ca bootstrap`, or in Kubernetes the daemon's
    /// projected service-account token (audience mesh-issuer).
    #[arg(long, value_name = "FILE", requires = "issuer")]
    pub issuer_token: Option<PathBuf>,
    /// CA certificate (PEM) this daemon issues node and workload
    /// certificates from, holding the CA key itself: for development on
    /// one machine; clusters use --issuer.
    #[arg(long, value_name = "FILE", requires_all = ["ca_key", "trust_bundle"])]
    pub ca_cert: Option<PathBuf>,
    /// The CA's private key (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["ca_cert", "trust_bundle"])]
    pub ca_key: Option<PathBuf>,
    /// Lifetime of issued certificates; renewed at 70% of it.
    #[arg(long, default_value = "24h", value_name = "DURATION", value_parser = long_duration)]
    pub cert_lifetime: std::time::Duration,
    /// The mTLS tunnel listener (HTTP/2 CONNECT); every node uses the same
    /// port. As --proxy-listen: one address per family, and 0.0.0.0 alone
    /// listens on [::] too.
    #[arg(long, default_value = "0.0.0.0:15008", value_name = "ADDR")]
    pub tunnel_listen: Vec<SocketAddr>,
    /// On SIGTERM, how long open proxied connections and tunnel streams
    /// may take to finish before the daemon exits anyway. Keep the pod's
    /// terminationGracePeriodSeconds above it.
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = duration)]
    pub drain_timeout: std::time::Duration,
    /// A relayed connection or tunnel stream that moves no byte either way
    /// for this long is closed (both ends), so an idle client cannot hold
    /// a backend connection forever; an HTTP/2 client connection on the
    /// request path gets a GOAWAY and is closed.
    #[arg(long, default_value = "1h", value_name = "DURATION", value_parser = long_duration)]
    pub idle_timeout: std::time::Duration,
    /// The largest request header block a client may send on a request
    /// port, in bytes: more is answered 431 (HTTP/1.1 and HTTP/2, which
    /// advertises it as SETTINGS_MAX_HEADER_LIST_SIZE).
    #[arg(long, default_value_t = 65536, value_name = "BYTES", value_parser = clap::value_parser!(u32).range(8192..=16 << 20))]
    pub max_request_headers: u32,
    /// Tunnel connections one peer identity (a node or a workload) may
    /// hold open to this node; more are closed after the handshake.
    #[arg(long, default_value_t = 64, value_name = "N", value_parser = clap::builder::TypedValueParser::map(clap::value_parser!(u32).range(1..), |n| n as usize))]
    pub tunnel_connections_per_peer: usize,
    /// Tunnel streams one peer identity may hold open on this node, over
    /// all its connections (each carries up to 1024); more are refused
    /// (503, `mesh-deny: peer_stream_limit`).
    #[arg(long, default_value_t = 16384, value_name = "N", value_parser = clap::builder::TypedValueParser::map(clap::value_parser!(u32).range(1..), |n| n as usize))]
    pub tunnel_streams_per_peer: usize,
    /// The control API and the admin endpoint: how long a client may take
    /// to send a request's headers (and, for the API, its body) before
    /// its connection is closed.
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = duration)]
    pub client_header_timeout: std::time::Duration,
    /// `appProtocol: auto` ports: how long a client may take to send its
    /// first bytes before the connection is treated as opaque TCP.
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = duration)]
    pub protocol_detect_timeout: std::time::Duration,
    /// Export spans of sampled requests (those arriving with a sampled W3C
    /// or B3 trace context) to this OTLP collector, e.g.
    /// `http://otel-collector.observability:4318`. Without it the proxy
    /// records no spans and passes trace headers on unchanged.
    #[arg(long, value_name = "URL", value_parser = otlp_endpoint)]
    pub otlp_endpoint: Option<hyper::Uri>,
    /// How spans reach the collector: http/protobuf (port 4318) or grpc
    /// (port 4317, HTTP/2 without TLS).
    #[arg(long, default_value = "http/protobuf", value_name = "PROTOCOL")]
    pub otlp_protocol: crate::telemetry::otlp::OtlpProtocol,
    /// Where this daemon hands its listening sockets to the next one (a
    /// restart or upgrade without a refused connection), and where a new
    /// daemon asks the running one for them [default:
    /// <state-dir>/handover.sock].
    #[arg(long, value_name = "PATH")]
    pub handover_socket: Option<PathBuf>,
    /// A file this daemon writes (its pid) once it serves and removes when
    /// it drains: `mesh-daemon probe` reads it, so a new pod is not taken
    /// for ready while the old pod's daemon still answers on the admin
    /// port they share (hostNetwork).
    #[arg(long, value_name = "FILE")]
    pub ready_file: Option<PathBuf>,
    /// On exit, detach the programs and remove every pin (uninstall).
    /// Without it the datapath keeps working until the next daemon.
    #[arg(long)]
    pub cleanup_on_exit: bool,
    /// Highest level the kernel programs log at: off, error, warn, info,
    /// debug, trace.
    #[arg(long, default_value = "warn", value_name = "LEVEL")]
    pub ebpf_log_level: EbpfLogLevel,
    /// Follow the Kubernetes API server: Services, EndpointSlices, Pods and
    /// Namespaces become the state, and the control API only reads. In a
    /// pod it uses the pod's service account, elsewhere KUBECONFIG. Needs
    /// a build with the `kubernetes` feature (the container image has it).
    #[arg(long, conflicts_with = "config")]
    pub kubernetes: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum EbpfLogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl EbpfLogLevel {
    pub(super) fn to_aya(self) -> Option<aya_log::Level> {
        Some(match self {
            EbpfLogLevel::Off => return None,
            EbpfLogLevel::Error => aya_log::Level::Error,
            EbpfLogLevel::Warn => aya_log::Level::Warn,
            EbpfLogLevel::Info => aya_log::Level::Info,
            EbpfLogLevel::Debug => aya_log::Level::Debug,
            EbpfLogLevel::Trace => aya_log::Level::Trace,
        })
    }
}

fn duration(s: &str) -> Result<std::time::Duration, Invalid> {
    crate::model::parse_duration(s)
}

/// An OTLP collector's base URL: `http://host:port`.
fn otlp_endpoint(s: &str) -> Result<hyper::Uri, Invalid> {
    let u: hyper::Uri = s.parse().map_err(|e| Invalid(format!("{s:?} is not a URL: {e}")))?;
    match (u.scheme_str(), u.authority()) {
        (Some("http"), Some(_)) => Ok(u),
        (Some("https"), _) => Err(Invalid(format!(
            "{s}: TLS to the collector is not supported yet; use http:// (a node-local collector or agent)"
        ))),
        _ => Err(Invalid(format!("{s:?}: give http://host:port"))),
    }
}

/// Like [`duration`], also taking hours (`24h`).
fn long_duration(s: &str) -> Result<std::time::Duration, Invalid> {
    match s.strip_suffix('h').and_then(|h| h.parse::<u64>().ok()) {
        Some(h) => Ok(std::time::Duration::from_secs(h * 3600)),
        None => crate::model::parse_duration(s),
    }
}

/// One address a listener flag asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr {
    pub addr: SocketAddr,
    /// The IPv6 companion of `0.0.0.0`, not named by the flag: bound when
    /// the host has IPv6, else left out with a warning.
    pub implied: bool,
}

/// The addresses `given` to `flag` ask for: at most one per family, all
/// on one port; and for `0.0.0.0` given alone, `[::]` on its port too,
/// so command lines written before IPv6 serve both families.
pub fn listen_set(given: &[SocketAddr], flag: &str) -> Result<Vec<ListenAddr>, super::RunError> {
    let mut out: Vec<ListenAddr> = Vec::new();
    for a in given {
        if let Some(o) = out.iter().find(|o| o.addr.is_ipv6() == a.is_ipv6()) {
            let family = if a.is_ipv6() { "IPv6" } else { "IPv4" };
            let why = format!("a second {family} address ({} is one); give one address per family", o.addr);
            return Err(super::RunError::flag(&format!("{flag} {a}"), why));
        }
        if let Some(o) = out.first().filter(|o| o.addr.port() != a.port()) {
            let why = format!("its port differs from {}'s; the addresses of one listener share a port", o.addr);
            return Err(super::RunError::flag(&format!("{flag} {a}"), why));
        }
        out.push(ListenAddr { addr: *a, implied: false });
    }
    if let [only] = out[..] {
        if only.addr.is_ipv4() && only.addr.ip().is_unspecified() {
            let v6 = SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), only.addr.port());
            out.push(ListenAddr { addr: v6, implied: true });
        }
    }
    Ok(out)
}

impl RunArgs {
    /// The tunnel's port, the same on every node.
    pub fn tunnel_port(&self) -> u16 {
        self.tunnel_listen.first().map_or(15008, SocketAddr::port)
    }

    /// Where the running daemon offers its sockets to the next one.
    pub fn handover_path(&self) -> PathBuf {
        self.handover_socket.clone().unwrap_or_else(|| self.state_dir.join("handover.sock"))
    }
}

#[cfg(test)]
mod listen_tests {
    use super::*;

    fn set(given: &[&str]) -> Result<Vec<(String, bool)>, crate::run::RunError> {
        let given: Vec<SocketAddr> = given.iter().map(|s| s.parse().unwrap()).collect();
        Ok(listen_set(&given, "--proxy-listen")?.into_iter().map(|l| (l.addr.to_string(), l.implied)).collect())
    }

    #[test]
    fn zero_address_alone_listens_on_both_families_and_named_addresses_as_named() {
        let both = [("0.0.0.0:15001".to_owned(), false), ("[::]:15001".to_owned(), true)];
        assert_eq!(set(&["0.0.0.0:15001"]).unwrap(), both);
        assert_eq!(set(&["172.18.0.2:15001"]).unwrap(), [("172.18.0.2:15001".to_owned(), false)]);
        assert_eq!(set(&["[::]:15001"]).unwrap(), [("[::]:15001".to_owned(), false)]);
        let named = set(&["0.0.0.0:15001", "[fd00::2]:15001"]).unwrap();
        assert_eq!(named, [("0.0.0.0:15001".to_owned(), false), ("[fd00::2]:15001".to_owned(), false)]);
        let e = set(&["0.0.0.0:15001", "10.0.0.1:15001"]).unwrap_err().to_string();
        assert!(e.contains("--proxy-listen 10.0.0.1:15001: a second IPv4 address (0.0.0.0:15001 is one)"), "{e}");
        let e = set(&["0.0.0.0:15001", "[::]:15002"]).unwrap_err().to_string();
        assert!(e.contains("[::]:15002: its port differs from 0.0.0.0:15001's"), "{e}");
    }
}
