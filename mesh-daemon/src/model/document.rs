//! The document operators write (`--config`, later `PUT /v1/state`): plain
//! serde structs with addresses and numbers kept loose, so that validation
//! can report every bad field by path instead of stopping at the first.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::Chunked;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Document {
    #[serde(default)]
    pub nodes: Vec<NodeDoc>,
    #[serde(default)]
    pub workloads: Vec<WorkloadDoc>,
    /// Shared between the documents of successive writes: a write copies
    /// pointers, and a service it did not touch is the same `Arc` as
    /// before, which is how validation and the views know what changed.
    #[serde(default)]
    pub services: Chunked<Arc<ServiceDoc>>,
    /// Gateway API `HTTPRoute`s whose parents are Services, written as
    /// for a cluster (see [`super::route`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Arc<super::route::RouteDoc>>,
    /// Gateway API `ReferenceGrant`s: which routes may name a backend
    /// Service of another namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reference_grants: Vec<Arc<super::route::doc::ReferenceGrantDoc>>,
    /// Istio `AuthorizationPolicy` objects, written as for a cluster (see
    /// [`super::authz`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<Arc<super::authz::PolicyDoc>>,
    /// Where each service was, shared by the documents made from this
    /// one; see [`Document::find_service`].
    #[serde(skip)]
    positions: Positions,
}

/// `namespace/name` -> index into `services`, as of when it was made:
/// a hint, checked on every use.
#[derive(Clone, Default)]
struct Positions(Arc<std::collections::HashMap<String, usize>>);

impl PartialEq for Positions {
    /// A cache: not part of what a document says.
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for Positions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("..")
    }
}

impl Document {
    /// The index of service `namespace/name`. Found through a map shared
    /// with the documents this one was copied from (a write's lookup
    /// costs no scan of every service); the map is made again when it no
    /// longer points at the service (after services moved).
    pub fn find_service(&mut self, namespace: &str, name: &str) -> Option<usize> {
        let at = |d: &Self| {
            let i = *d.positions.0.get(&format!("{namespace}/{name}"))?;
            d.services.get(i).filter(|s| s.namespace == namespace && s.name == name).map(|_| i)
        };
        if let Some(i) = at(self) {
            return Some(i);
        }
        let map = self.services.iter().enumerate().map(|(i, s)| (format!("{}/{}", s.namespace, s.name), i)).collect();
        self.positions = Positions(Arc::new(map));
        at(self)
    }

    /// Drops the growth slack of service `i`'s lists, if this document
    /// holds it alone (just parsed): a parsed list grows by doubling, and
    /// the slack would stay as long as the service does.
    pub fn shrink(&mut self, i: usize) {
        if let Some(s) = Arc::get_mut(&mut self.services[i]) {
            s.endpoints.shrink_to_fit();
            s.ports.shrink_to_fit();
        }
    }

    /// Service `i` to edit: a copy when it is shared with another
    /// document (the one before a write), so that one is left as it is.
    pub fn service_mut(&mut self, i: usize) -> &mut ServiceDoc {
        Arc::make_mut(&mut self.services[i])
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeDoc {
    pub name: String,
    /// Where other nodes (and this node's pods) reach this node: one
    /// address, or `addresses` with one per family.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub address: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadDoc {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default = "default_namespace")]
    pub service_account: String,
    pub node: String,
    /// The pod's address, or `ips` with one per family (as `podIPs`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ip: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
    /// Path of the pod's network namespace (e.g. `/var/run/netns/x`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// Or: a process inside the pod; its `/proc/<pid>/ns/net` is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i64>,
    /// The pod's labels, which policies select workloads by.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceDoc {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The service address, or `vips` with one per family (as
    /// `clusterIPs`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub vip: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vips: Vec<String>,
    #[serde(default = "default_mode")]
    pub mode: String,
    #[serde(default)]
    pub ports: Vec<PortDoc>,
    #[serde(default)]
    pub endpoints: Vec<EndpointDoc>,
    /// Active health checks of the endpoints [default: tcp, 5s, 1s, 2, 3].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckDoc>,
    /// When no endpoint is healthy: use all of them (true) or none.
    #[serde(default = "default_true")]
    pub fail_open: bool,
    /// Proxy: how long a connect to an endpoint may take [default 1s].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<String>,
    /// Proxy: other endpoints tried after a failed connect [default 3].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<i64>,
    /// Proxy: the most all tries of one connection may take [default 5s].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<String>,
    /// Between nodes: `required` (mTLS tunnel, the default) or `disabled`
    /// (plain TCP, for debugging).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<String>,
    /// Who may reach this service's endpoints through the tunnel
    /// [default: any identity of the same trust domain].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<AuthorizationDoc>,
    /// What the proxy does per request on request ports (`appProtocol`
    /// other than `tcp`): timeouts, retries, outlier ejection, rate limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpDoc>,
    /// `on` (the default), `off`, or the share of its successful
    /// connections and requests the access log writes (`10%`; failures
    /// are always written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpDoc {
    /// The whole request, retries included, until the response headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// One try, until its response headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetriesDoc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier: Option<OutlierDoc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitDoc>,
    /// `set` (the default): requests reach the workload with the verified
    /// caller in `x-forwarded-client-cert`; `off`: without it (a client's
    /// copy is removed either way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward_client_cert: Option<String>,
    /// Per-prefix routes, gone: read only to say what replaces them (an
    /// HTTPRoute), never applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<serde_json::Value>")]
    pub routes: Option<serde_yaml::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetriesDoc {
    /// `connect-failure`, `5xx`, `gateway-error`, status codes, gRPC
    /// statuses (`unavailable`, ...) [default: gateway-error, and
    /// unavailable on gRPC ports].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_on: Option<Vec<String>>,
    /// Retries after the first try [default 2].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetDoc>,
    /// Largest request body kept to send again [default 64KiB].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body: Option<String>,
    /// Methods that may be retried [default: the idempotent ones; every
    /// call on gRPC ports].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BudgetDoc {
    /// Retries allowed per request [default 0.2].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    /// Retries allowed per second on top [default 10].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_per_second: Option<i64>,
    /// Over how long requests and retries are counted [default 10s].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutlierDoc {
    /// Failed answers in a row that eject an endpoint [default 5; 0: off].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive5xx: Option<i64>,
    /// Most of a service's endpoints ejected at once [default 50; at least one].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejected_percent: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimitDoc {
    pub requests_per_second: f64,
    /// Requests allowed at once above the rate [default: requestsPerSecond].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<i64>,
    /// One bucket per client identity instead of one per service.
    #[serde(default)]
    pub per_identity: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationDoc {
    /// SPIFFE IDs allowed.
    #[serde(default)]
    pub identities: Vec<String>,
    /// Namespaces whose workloads (same trust domain) are allowed.
    #[serde(default)]
    pub namespaces: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HealthCheckDoc {
    /// tcp (connect), http (GET `path`, expect 2xx) or none.
    #[serde(default = "default_check")]
    pub protocol: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Successes in a row that make an endpoint healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rise: Option<i64>,
    /// Failures in a row that make it unhealthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fall: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortDoc {
    pub port: i64,
    /// Defaults to `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<i64>,
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// `tcp` (default), `http`, `http2`, `grpc` or `auto`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EndpointDoc {
    pub ip: String,
    pub node: String,
    #[serde(default = "default_weight")]
    pub weight: i64,
    /// 0 is the most preferred level; a level takes traffic only while no
    /// better one has a healthy endpoint.
    #[serde(default)]
    pub priority: i64,
}

fn default_namespace() -> String {
    "default".into()
}
fn default_mode() -> String {
    "proxy".into()
}
fn default_protocol() -> String {
    "TCP".into()
}
fn default_weight() -> i64 {
    1
}
fn default_true() -> bool {
    true
}
fn default_check() -> String {
    "tcp".into()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_service_is_found_where_it_is_after_services_moved() {
        let mut d = crate::model::parse_document(
            "services: [{name: a, vip: 10.96.0.1}, {name: b, vip: 10.96.0.2}, {name: c, vip: 10.96.0.3}]",
        )
        .unwrap();
        assert_eq!(d.find_service("default", "c"), Some(2));
        let mut copy = d.clone();
        copy.services.remove(0);
        assert_eq!(copy.find_service("default", "c"), Some(1), "the shared map is stale: made again");
        assert_eq!(d.find_service("default", "c"), Some(2), "the original's is not");
        assert_eq!(copy.find_service("default", "a"), None);
        assert_eq!(copy.find_service("other", "b"), None);
    }
}
