//! The desired state of the mesh and the one place that decides what is
//! legal. Everything else receives a validated [`State`].
#![forbid(unsafe_code)]

mod access_log;
mod addrs;
pub mod authz;
pub mod capacity;
mod chunked;
mod diff;
mod document;
mod errors;
pub mod http;
mod ids;
mod load;
mod names;
pub mod route;
pub mod slots;
mod snapshot;
pub mod spiffe;
mod validate;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use access_log::AccessLog;
pub use addrs::{parse_ip, Addresses, Family};
pub use capacity::{MapCapacity, MapNeeds, DEFAULT_SLOT_ENTRIES, DEFAULT_SLOT_TABLE_SIZE};
pub use chunked::Chunked;
pub use diff::{diff, DiffEntry};
pub use document::{
    AuthorizationDoc, BudgetDoc, Document, EndpointDoc, HealthCheckDoc, HttpDoc, NodeDoc, OutlierDoc, PortDoc,
    RateLimitDoc, RetriesDoc, ServiceDoc, WorkloadDoc,
};
pub(crate) use errors::invalid;
pub use errors::{FieldError, Invalid, ValidationErrors};
pub use ids::{PortKey, ServiceIds, ServiceKey};
pub use load::{load_file, parse_document, schema, ConfigError};
use names::bounded_duration;
pub use names::{parse_duration, Name, NodeName, Port, Weight, INJECT_LABEL};
pub use snapshot::{Delta, Snapshot, View};
pub use spiffe::{Identity, IdentityError};
pub use validate::{Changes, Index, Validated};

/// A validated state. Built only by [`State::from_document`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct State {
    pub nodes: Vec<Node>,
    pub workloads: Vec<Workload>,
    /// Shared with the state before: a service a write did not change is
    /// the same `Arc`.
    pub services: Chunked<Arc<Service>>,
    /// The routes, compiled; the same `Arc` as the state before's when
    /// the write left them as they were.
    pub routes: Arc<route::Routes>,
    /// The authorization policies, compiled; the same `Arc` as the state
    /// before's when the write left them (and what they apply to) as they
    /// were.
    pub policies: Arc<authz::Policies>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub name: NodeName,
    /// Where other nodes (and this node's pods) reach it: one address per
    /// family it has.
    pub addresses: Addresses,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    pub name: Name,
    pub namespace: Name,
    pub service_account: Name,
    pub node: NodeName,
    /// One address per family the pod has.
    pub ips: Addresses,
    pub netns: NetnsRef,
    pub labels: std::collections::BTreeMap<String, String>,
}

/// How the daemon finds a workload's network namespace.
#[derive(Debug, Clone, PartialEq)]
pub enum NetnsRef {
    Path(PathBuf),
    Pid(u32),
}

impl NetnsRef {
    pub fn path(&self) -> PathBuf {
        match self {
            NetnsRef::Path(p) => p.clone(),
            NetnsRef::Pid(pid) => PathBuf::from(format!("/proc/{pid}/ns/net")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Connections go through the node proxy.
    Proxy,
    /// connect4 picks a backend from the slot table; no proxy on the path.
    Kernel,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub name: Name,
    pub namespace: Name,
    /// One VIP per family it serves (Kubernetes' `clusterIPs`); a VIP's
    /// connections go to the endpoints of its family.
    pub vips: Addresses,
    pub mode: Mode,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Endpoint>,
    /// None: no active checks (`protocol: none`).
    pub health_check: Option<HealthCheck>,
    pub fail_open: bool,
    pub connect_timeout: Duration,
    pub retries: u32,
    pub retry_budget: Duration,
    /// Cross-node connections go through the mTLS tunnel.
    pub mtls: bool,
    /// None: the same trust domain is allowed.
    pub authorization: Option<Authorization>,
    /// Per request, on request ports.
    pub http: http::HttpPolicy,
    /// Which of its connections and requests the access log writes.
    pub access_log: AccessLog,
}

/// Who may reach a service's endpoints through the tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    pub identities: Vec<Identity>,
    pub namespaces: Vec<Name>,
}

impl Authorization {
    /// Whether `peer` may reach the service; `policy` None allows the
    /// local trust domain only.
    pub fn allows(policy: Option<&Authorization>, trust_domain: &str, peer: &Identity) -> bool {
        match policy {
            None => peer.trust_domain() == trust_domain,
            Some(a) => {
                a.identities.contains(peer)
                    || (peer.trust_domain() == trust_domain
                        && peer.namespace().is_some_and(|ns| a.namespaces.iter().any(|n| n.as_str() == ns)))
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CheckKind {
    Tcp,
    /// GET this path, expect 2xx.
    Http(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HealthCheck {
    pub kind: CheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

impl Service {
    /// `namespace/name`, how users refer to a service.
    pub fn key(&self) -> ServiceKey {
        ServiceKey { namespace: self.namespace.clone(), name: self.name.clone() }
    }

    /// Its endpoints of `family`, with their index in `endpoints`.
    pub fn endpoints_of(&self, family: Family) -> impl Iterator<Item = (usize, &Endpoint)> + '_ {
        self.endpoints.iter().enumerate().filter(move |(_, e)| Family::of(e.ip) == family)
    }

    /// The key of each of its frontends (one per port and VIP), as
    /// [`ServiceIds`] hands out ids by.
    pub fn frontend_keys(&self) -> impl Iterator<Item = String> + '_ {
        self.ports.iter().flat_map(move |p| self.vips.families().map(move |f| frontend_key(self, p.port, f)))
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServicePort {
    pub port: Port,
    pub target_port: Port,
    pub app_protocol: AppProtocol,
}

/// What a service port carries above TCP (Kubernetes' `appProtocol`): it
/// decides whether the proxy relays bytes or routes each request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AppProtocol {
    /// Opaque bytes: one decision per connection.
    #[default]
    Tcp,
    /// HTTP/1.1 from the client; every request routed on its own.
    Http,
    /// HTTP/2 with prior knowledge (h2c).
    Http2,
    /// HTTP/2 with gRPC status handling.
    Grpc,
    /// Detected from the first bytes: HTTP/2's preface, an HTTP/1 request
    /// line, or else (and after the detection timeout) opaque TCP.
    Auto,
}

impl AppProtocol {
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        Ok(match s {
            "tcp" => AppProtocol::Tcp,
            "http" => AppProtocol::Http,
            "http2" => AppProtocol::Http2,
            "grpc" => AppProtocol::Grpc,
            "auto" => AppProtocol::Auto,
            other => {
                return Err(invalid!(
                    "{other:?} is not an application protocol: use \"tcp\", \"http\", \"http2\", \"grpc\" or \"auto\""
                ))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AppProtocol::Tcp => "tcp",
            AppProtocol::Http => "http",
            AppProtocol::Http2 => "http2",
            AppProtocol::Grpc => "grpc",
            AppProtocol::Auto => "auto",
        }
    }

    /// Whether the proxy may see requests on this port.
    pub fn is_requests(self) -> bool {
        !matches!(self, AppProtocol::Tcp)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    /// Of a family the service has a VIP of.
    pub ip: IpAddr,
    pub node: NodeName,
    pub weight: Weight,
    /// 0 is the most preferred.
    pub priority: u8,
}

impl Endpoint {
    pub fn addr(&self, port: Port) -> SocketAddr {
        SocketAddr::new(self.ip, port.0)
    }
}

impl State {
    pub fn from_document(doc: &Document) -> Result<Self, ValidationErrors> {
        validate::validate(None, doc, 0).map(|v| v.state)
    }

    /// `doc` validated as a change of `prev` (the accepted document, its
    /// state and [`Index`]): only the services that are not the same `Arc`
    /// as before are checked; see [`Validated`].
    pub fn from_changes(
        prev: (&Document, &State, &Index),
        doc: &Document,
        table_size: u32,
    ) -> Result<Validated, ValidationErrors> {
        validate::validate(Some(prev), doc, table_size)
    }

    pub fn node(&self, name: &NodeName) -> Option<&Node> {
        self.nodes.iter().find(|n| &n.name == name)
    }
}

/// One (service, port, VIP) triple: what `SERVICES` is keyed by and what
/// the proxy routes by; a dual-stack service has two per port, one per
/// family, each balancing over the endpoints of its family. `id` is what
/// the kernel records as the original destination's service; it comes
/// from [`ServiceIds`] and stays the same across writes.
#[derive(Debug, Clone, PartialEq)]
pub struct Frontend {
    pub id: u32,
    /// Index into [`State::services`].
    pub service: usize,
    pub vip: IpAddr,
    pub port: Port,
    pub target_port: Port,
    pub app_protocol: AppProtocol,
}

/// `namespace/name:port` (IPv4) or `namespace/name:port@ipv6`: the stable
/// name of a frontend. An IPv4 frontend keeps the key of the daemons
/// before IPv6, and so its id across an upgrade.
pub fn frontend_key(service: &Service, port: Port, family: Family) -> String {
    match family {
        Family::V4 => format!("{}:{}", service.key(), port),
        Family::V6 => format!("{}:{}@ipv6", service.key(), port),
    }
}

impl Frontend {
    pub fn family(&self) -> Family {
        Family::of(self.vip)
    }
}

impl State {
    /// Every service port with its id from `ids`, in the order of
    /// (namespace, name, port). Ports without an id are left out: assign
    /// ids with [`ServiceIds::assign`] first.
    pub fn frontends(&self, ids: &ServiceIds) -> Vec<Frontend> {
        let mut out = Vec::new();
        for (i, s) in self.services.iter().enumerate() {
            for p in &s.ports {
                for vip in s.vips.iter() {
                    if let Some(id) = ids.get(&frontend_key(s, p.port, Family::of(vip))) {
                        out.push(Frontend {
                            id,
                            service: i,
                            vip,
                            port: p.port,
                            target_port: p.target_port,
                            app_protocol: p.app_protocol,
                        });
                    }
                }
            }
        }
        out.sort_by(|a, b| {
            let (sa, sb) = (&self.services[a.service], &self.services[b.service]);
            (&sa.namespace, &sa.name, a.port, a.family()).cmp(&(&sb.namespace, &sb.name, b.port, b.family()))
        });
        out
    }

    /// The key of every frontend (see [`frontend_key`]).
    pub fn frontend_keys(&self) -> Vec<String> {
        self.services.iter().flat_map(|s| s.frontend_keys()).collect()
    }
}
