//! From Kubernetes objects to the mesh's state document: a pure function,
//! so that every rule is tested on objects as the API server returns them.
//!
//! - **Services**: every Service with an IPv4 ClusterIP (headless and
//!   ExternalName ones have none) becomes a VIP with its TCP ports.
//!   `mesh.io/mode: kernel` balances it in the kernel; otherwise through the
//!   node proxy. A Service in a meshed namespace crosses nodes through the
//!   mTLS tunnel; one elsewhere has no mesh identity on the other side, so
//!   it crosses as plain TCP (`mtls: disabled`). A Service whose endpoints
//!   are all outside the pod network (no node, e.g. `default/kubernetes`)
//!   is left out: the mesh does not touch its traffic.
//! - **Per-request policy**, from the Service's annotations (see
//!   [`HTTP_ANNOTATIONS`]): `mesh.io/timeout`, `mesh.io/per-try-timeout`,
//!   `mesh.io/retry-on` (comma-separated), `mesh.io/retry-attempts`,
//!   `mesh.io/retry-max-body`, `mesh.io/consecutive-5xx`,
//!   `mesh.io/rate-limit` (requests per second), `mesh.io/rate-limit-burst`,
//!   `mesh.io/rate-limit-per-identity` and `mesh.io/forward-client-cert`
//!   (`set` or `off`). Bad values leave all of them
//!   out for that Service, with the reason.
//! - **The access log** writes every connection and request of a Service
//!   unless its `mesh.io/access-log` says `off`, or a share (`10%`: every
//!   failure and a tenth of the rest).
//! - **Active health checks** are off: an endpoint's readiness comes from
//!   its EndpointSlice (the kubelet's probes) and the proxy's passive
//!   breakers act on failures, so no node probes every endpoint of the
//!   cluster. A Service opts in with `mesh.io/health-check`: `tcp`, or
//!   `http:/path` (a bad value: off, with the reason).
//! - **Endpoints**, from the Service's IPv4 EndpointSlices: ready ones with
//!   the weight of their pod's `mesh.io/weight` annotation (default 1);
//!   terminating ones with weight 0 (drained: no new connections, open ones
//!   go on); not-ready ones left out. The node is the endpoint's
//!   `nodeName`; a named target port is resolved through the slice's ports.
//! - **Nodes**: every node a pod runs on, at its pod's `status.hostIP`.
//! - **Workloads** (enrolled): this node's pods in namespaces labelled
//!   `mesh.io/inject=enabled`, running with an IPv4 address on the pod
//!   network, with the identity of their service account; their network
//!   namespace is that of one of their processes (`pid_of`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::model::{invalid, Addresses, Family, Invalid};
use crate::model::{
    Document, EndpointDoc, HealthCheckDoc, HttpDoc, Name, NodeDoc, OutlierDoc, PortDoc, RateLimitDoc, RetriesDoc,
    ServiceDoc, WorkloadDoc,
};

pub use crate::model::INJECT_LABEL;
pub const WEIGHT_ANNOTATION: &str = "mesh.io/weight";
pub const MODE_ANNOTATION: &str = "mesh.io/mode";
pub const HEALTH_CHECK_ANNOTATION: &str = "mesh.io/health-check";
pub const ACCESS_LOG_ANNOTATION: &str = "mesh.io/access-log";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The Service annotations that set its per-request policy.
pub const HTTP_ANNOTATIONS: [&str; 10] = [
    "mesh.io/forward-client-cert",
    "mesh.io/timeout",
    "mesh.io/per-try-timeout",
    "mesh.io/retry-on",
    "mesh.io/retry-attempts",
    "mesh.io/retry-max-body",
    "mesh.io/consecutive-5xx",
    "mesh.io/rate-limit",
    "mesh.io/rate-limit-burst",
    "mesh.io/rate-limit-per-identity",
];

/// The active check a Service asks for with `mesh.io/health-check`: off
/// unless it says `tcp` or `http:/path`; a bad value is reported and off.
fn health_check(
    annotations: Option<&BTreeMap<String, String>>,
    what: &str,
    skipped: &mut Vec<String>,
) -> HealthCheckDoc {
    let doc = |protocol: &str, path: Option<&str>| HealthCheckDoc {
        protocol: protocol.to_owned(),
        path: path.map(str::to_owned),
        interval: None,
        timeout: None,
        rise: None,
        fall: None,
    };
    match annotations.and_then(|a| a.get(HEALTH_CHECK_ANNOTATION)).map(|v| v.trim()) {
        None | Some("none") => doc("none", None),
        Some("tcp") => doc("tcp", None),
        Some(v) if v.strip_prefix("http:").is_some_and(|p| p.starts_with('/')) => doc("http", v.strip_prefix("http:")),
        Some(other) => {
            skipped.push(format!(
                "{what}: {HEALTH_CHECK_ANNOTATION}: {other:?} is not tcp, http:/path or none; active checks stay off"
            ));
            doc("none", None)
        }
    }
}

/// The Service's `mesh.io/access-log` (`on`, `off`, `10%`); a bad value
/// is left out (every record is written), with the reason in `skipped`.
fn access_log(annotations: Option<&BTreeMap<String, String>>, what: &str, skipped: &mut Vec<String>) -> Option<String> {
    let v = annotations?.get(ACCESS_LOG_ANNOTATION)?.trim();
    match crate::model::AccessLog::parse(v) {
        Ok(_) => Some(v.to_owned()),
        Err(why) => {
            skipped.push(format!("{what}: {ACCESS_LOG_ANNOTATION}: {why}; every record is logged"));
            None
        }
    }
}

/// The per-request policy the annotations give, if any; a value that does
/// not parse or validate leaves it out, with the reason in `skipped`.
fn http_policy(
    annotations: Option<&BTreeMap<String, String>>,
    ports: &[PortDoc],
    what: &str,
    skipped: &mut Vec<String>,
) -> Option<HttpDoc> {
    let a = annotations?;
    let get = |k: &str| a.get(k).map(|v| v.trim().to_owned());
    if !HTTP_ANNOTATIONS.iter().any(|k| a.contains_key(*k)) {
        return None;
    }
    let int = |k: &str| -> Result<Option<i64>, Invalid> {
        get(k).map(|v| v.parse::<i64>().map_err(|_| invalid!("{k}: {v:?} is not a whole number"))).transpose()
    };
    let parsed = (|| -> Result<HttpDoc, Invalid> {
        let attempts = int("mesh.io/retry-attempts")?;
        let retry_on = get("mesh.io/retry-on").map(|v| v.split(',').map(|s| s.trim().to_owned()).collect::<Vec<_>>());
        let max_body = get("mesh.io/retry-max-body");
        let retries = (retry_on.is_some() || attempts.is_some() || max_body.is_some()).then(|| RetriesDoc {
            retry_on,
            attempts,
            max_body,
            ..Default::default()
        });
        let consecutive = int("mesh.io/consecutive-5xx")?;
        let outlier = consecutive.map(|n| OutlierDoc { consecutive5xx: Some(n), max_ejected_percent: None });
        let rate_limit = match get("mesh.io/rate-limit") {
            None => None,
            Some(v) => {
                let rps = v
                    .trim_end_matches("/s")
                    .parse::<f64>()
                    .map_err(|_| invalid!("mesh.io/rate-limit: {v:?} is not requests per second (100, or 100/s)"))?;
                let per_identity = match get("mesh.io/rate-limit-per-identity").as_deref() {
                    None | Some("false") => false,
                    Some("true") => true,
                    Some(o) => return Err(invalid!("mesh.io/rate-limit-per-identity: {o:?} is not true or false")),
                };
                Some(RateLimitDoc { requests_per_second: rps, burst: int("mesh.io/rate-limit-burst")?, per_identity })
            }
        };
        Ok(HttpDoc {
            timeout: get("mesh.io/timeout"),
            per_try_timeout: get("mesh.io/per-try-timeout"),
            retries,
            outlier,
            rate_limit,
            forward_client_cert: get("mesh.io/forward-client-cert"),
            routes: None,
        })
    })();
    let doc = match parsed {
        Ok(d) => d,
        Err(why) => {
            skipped.push(format!("{what}: {why}; its per-request annotations are left out"));
            return None;
        }
    };
    // Check against what validation will see, so one bad annotation never
    // makes the whole state invalid.
    let typed: Vec<crate::model::ServicePort> = ports
        .iter()
        .filter_map(|p| {
            Some(crate::model::ServicePort {
                port: crate::model::Port::parse(p.port).ok()?,
                target_port: crate::model::Port::parse(p.target_port.unwrap_or(p.port)).ok()?,
                app_protocol: crate::model::AppProtocol::parse(p.app_protocol.as_deref().unwrap_or("tcp")).ok()?,
            })
        })
        .collect();
    match crate::model::http::check(&doc, &typed) {
        Ok(()) => Some(doc),
        Err(errors) => {
            skipped.push(format!("{what}: {}; its per-request annotations are left out", errors.join("; ")));
            None
        }
    }
}

/// What discovery has seen of the cluster.
#[derive(Debug, Default, Clone, Copy)]
pub struct Objects<'a> {
    pub services: &'a [&'a Service],
    pub slices: &'a [&'a EndpointSlice],
    pub namespaces: &'a [&'a Namespace],
    pub pods: &'a [&'a Pod],
}

/// The document, and what was left out with the reason (for the log).
#[derive(Debug, Default)]
pub struct Translation {
    pub document: Document,
    pub skipped: Vec<String>,
    /// Services translated in this pass; the others were taken from the
    /// [`Memo`] because nothing they are made from changed.
    pub services_translated: usize,
}

/// What the last pass made of each Service, with a fingerprint of what it
/// was made from (the resourceVersions of the Service, its EndpointSlices
/// and the pods they name, whether its namespace is meshed, and the
/// cluster's nodes): a pass translates only the Services whose
/// fingerprint changed, so one EndpointSlice update costs that Service.
#[derive(Debug, Default)]
pub struct Memo {
    services: HashMap<(String, String), Kept>,
}

/// One Service's fingerprint, what it became, and what was said of it.
type Kept = (u64, Option<std::sync::Arc<ServiceDoc>>, Vec<String>);

/// The fingerprint of a Service's inputs; None when one of them carries no
/// resourceVersion (then it is always translated).
fn fingerprint(
    s: &Service,
    own: &[&EndpointSlice],
    pods: &BTreeMap<(&str, &str), &Pod>,
    meshed: bool,
    nodes: u64,
) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let ns = s.metadata.namespace.as_deref()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (s.metadata.resource_version.as_deref()?, meshed, nodes).hash(&mut h);
    for sl in own {
        (sl.metadata.name.as_deref(), sl.metadata.resource_version.as_deref()?).hash(&mut h);
        for e in &sl.endpoints {
            let Some(r) = e.target_ref.as_ref().filter(|r| r.kind.as_deref() == Some("Pod")) else { continue };
            let pod = r.name.as_deref().and_then(|n| pods.get(&(r.namespace.as_deref().unwrap_or(ns), n)));
            pod.map(|p| p.metadata.resource_version.as_deref()).hash(&mut h);
        }
    }
    Some(h.finish())
}

/// The mesh's `appProtocol` of a Service port: its `appProtocol` (`http`,
/// `http2`, `kubernetes.io/h2c`, `grpc`), else an Istio-style name prefix
/// (`http-`, `http2-`, `grpc-`), else none (tcp). An HTTP port of a
/// `mesh.io/mode: kernel` Service stays tcp: the kernel cannot see
/// requests (see `translate`).
pub fn app_protocol(app_protocol: Option<&str>, name: Option<&str>) -> Option<&'static str> {
    match app_protocol {
        Some("http") => return Some("http"),
        Some("http2" | "kubernetes.io/h2c") => return Some("http2"),
        Some("grpc") => return Some("grpc"),
        Some(_) => return None,
        None => {}
    }
    let name = name.unwrap_or("");
    [("http2-", "http2"), ("grpc-", "grpc"), ("http-", "http")]
        .iter()
        .find(|(prefix, _)| name.starts_with(prefix) || name == &prefix[..prefix.len() - 1])
        .map(|(_, p)| *p)
}

/// The state for the daemon of `node`. `pid_of` finds a process of a
/// local pod (for its network namespace). What `memo` kept of the
/// Services whose inputs did not change is reused, and this pass's is
/// kept for the next.
pub fn translate_with(
    objs: Objects<'_>,
    node: &str,
    pid_of: &mut dyn FnMut(&Pod) -> Option<i64>,
    memo: &mut Memo,
) -> Translation {
    let mut t = Translation::default();
    let meshed: BTreeSet<&str> = objs
        .namespaces
        .iter()
        .filter(|n| label(&n.metadata.labels, INJECT_LABEL) == Some("enabled"))
        .filter_map(|n| n.metadata.name.as_deref())
        .collect();
    let pods: BTreeMap<(&str, &str), &Pod> = objs
        .pods
        .iter()
        .filter_map(|&p| Some(((p.metadata.namespace.as_deref()?, p.metadata.name.as_deref()?), p)))
        .collect();

    // A node's addresses, as its pods' `hostIPs` (or `hostIP`) say.
    let nodes: BTreeMap<&str, Addresses> = objs
        .pods
        .iter()
        .filter_map(|p| {
            let name = p.spec.as_ref()?.node_name.as_deref()?;
            let s = p.status.as_ref()?;
            let listed = s.host_ips.iter().flatten().map(|h| h.ip.as_str());
            let ips = one_per_family(listed.chain(s.host_ip.as_deref()));
            (!ips.is_empty()).then_some((name, ips))
        })
        .collect();
    t.document.nodes = nodes
        .iter()
        .map(|(n, ips)| {
            let (address, addresses) = doc_addresses(ips);
            NodeDoc { name: (*n).to_owned(), address, addresses }
        })
        .collect();

    for p in objs.pods {
        if let Some(w) = workload(p, node, nodes.get(node), &meshed, pid_of, &mut t.skipped) {
            t.document.workloads.push(w);
        }
    }
    t.document.workloads.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));

    // Each Service's slices, found once (not a scan of every slice per
    // Service).
    let mut slices: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for sl in objs.slices.iter().copied().filter(|sl| sl.address_type == "IPv4" || sl.address_type == "IPv6") {
        if let (Some(ns), Some(svc)) =
            (sl.metadata.namespace.as_deref(), label(&sl.metadata.labels, SERVICE_NAME_LABEL))
        {
            slices.entry((ns, svc)).or_default().push(sl);
        }
    }
    for v in slices.values_mut() {
        v.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    }
    let nodes_hash = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        nodes.hash(&mut h);
        h.finish()
    };
    let mut kept = HashMap::new();
    for s in objs.services {
        let (Some(ns), Some(name)) = (s.metadata.namespace.as_deref(), s.metadata.name.as_deref()) else { continue };
        let own = slices.get(&(ns, name)).map_or(&[][..], Vec::as_slice);
        let key = (ns.to_owned(), name.to_owned());
        let print = fingerprint(s, own, &pods, meshed.contains(ns), nodes_hash);
        let (doc, skipped) = match (print, memo.services.remove(&key)) {
            (Some(p), Some((q, doc, skipped))) if p == q => (doc, skipped),
            _ => {
                t.services_translated += 1;
                let mut skipped = Vec::new();
                (service(s, own, &pods, &nodes, &meshed, &mut skipped).map(std::sync::Arc::new), skipped)
            }
        };
        t.skipped.extend(skipped.iter().cloned());
        if let Some(d) = &doc {
            t.document.services.push(d.clone());
        }
        if let Some(p) = print {
            kept.insert(key, (p, doc, skipped));
        }
    }
    memo.services = kept;
    t.document.services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    t
}

/// The first address of each family among `ips` (those a document may
/// name; see [`crate::model::parse_ip`]).
fn one_per_family<'a>(ips: impl Iterator<Item = &'a str>) -> Addresses {
    let mut out = Addresses::default();
    for ip in ips.filter_map(|s| crate::model::parse_ip(s).ok()) {
        if out.get(Family::of(ip)).is_none() {
            out.set(ip);
        }
    }
    out
}

/// `ips` as a document writes them: one as the single field, two as the
/// list.
fn doc_addresses(ips: &Addresses) -> (String, Vec<String>) {
    match ips.len() {
        1 => (ips.primary().to_string(), Vec::new()),
        _ => (String::new(), ips.iter().map(|ip| ip.to_string()).collect()),
    }
}

fn label<'a>(labels: &'a Option<BTreeMap<String, String>>, key: &str) -> Option<&'a str> {
    labels.as_ref()?.get(key).map(String::as_str)
}

fn workload(
    p: &Pod,
    node: &str,
    node_ips: Option<&Addresses>,
    meshed: &BTreeSet<&str>,
    pid_of: &mut dyn FnMut(&Pod) -> Option<i64>,
    skipped: &mut Vec<String>,
) -> Option<WorkloadDoc> {
    let (ns, name) = (p.metadata.namespace.as_deref()?, p.metadata.name.as_deref()?);
    let spec = p.spec.as_ref()?;
    if spec.node_name.as_deref() != Some(node) || !meshed.contains(ns) {
        return None;
    }
    let status = p.status.as_ref()?;
    let mut skip = |why: &str| {
        skipped.push(format!("pod {ns}/{name}: {why}"));
        None
    };
    if spec.host_network == Some(true) {
        return skip("uses the host's network, which cannot be enrolled");
    }
    if status.phase.as_deref() != Some("Running") {
        return None;
    }
    let listed = status.pod_ips.iter().flatten().map(|p| p.ip.as_str());
    // Its connections of a family reach the proxy at the node's address
    // of that family: an address of a family the node lacks is not meshed.
    let mut ips = Addresses::default();
    for ip in one_per_family(listed.chain(status.pod_ip.as_deref())).iter() {
        match node_ips {
            Some(n) if n.get(Family::of(ip)).is_none() => {
                let f = Family::of(ip);
                skip(&format!("its {f} address {ip} is not meshed: node {node} has no {f} address"));
            }
            _ => {
                ips.set(ip);
            }
        }
    }
    if ips.is_empty() {
        return skip("has no IP address yet");
    }
    let (ip, ips) = doc_addresses(&ips);
    if Name::parse(name).is_err() {
        return skip("its name is not a DNS-1123 label, which workload names must be");
    }
    let Some(pid) = pid_of(p) else {
        return skip("no process of it was found, so its network namespace is unknown");
    };
    Some(WorkloadDoc {
        name: name.to_owned(),
        namespace: ns.to_owned(),
        service_account: spec.service_account_name.clone().unwrap_or_else(|| "default".into()),
        node: node.to_owned(),
        ip,
        ips,
        netns: None,
        pid: Some(pid),
        labels: p.metadata.labels.clone().unwrap_or_default(),
    })
}

fn service(
    s: &Service,
    own: &[&EndpointSlice],
    pods: &BTreeMap<(&str, &str), &Pod>,
    nodes: &BTreeMap<&str, Addresses>,
    meshed: &BTreeSet<&str>,
    skipped: &mut Vec<String>,
) -> Option<ServiceDoc> {
    let (ns, name) = (s.metadata.namespace.as_deref()?, s.metadata.name.as_deref()?);
    let spec = s.spec.as_ref()?;
    // `clusterIPs`, one per family of `ipFamilies` (or the one
    // `clusterIP`). Headless ("None") and ExternalName Services have none.
    let listed = spec.cluster_ips.iter().flatten().map(String::as_str);
    let vips = one_per_family(listed.chain(spec.cluster_ip.as_deref()));
    if vips.is_empty() {
        return None;
    }
    let mode = match s.metadata.annotations.as_ref().and_then(|a| a.get(MODE_ANNOTATION)).map(String::as_str) {
        None | Some("proxy") => "proxy",
        Some("kernel") => "kernel",
        Some(other) => {
            skipped.push(format!(
                "service {ns}/{name}: {MODE_ANNOTATION}: {other:?} is neither kernel nor proxy; using proxy"
            ));
            "proxy"
        }
    };
    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        if p.protocol.as_deref().unwrap_or("TCP") != "TCP" {
            continue;
        }
        // The slices' port of the same name carries the resolved number.
        let resolved = own.iter().flat_map(|sl| sl.ports.iter().flatten()).find(|sp| {
            sp.name.as_deref().unwrap_or("") == p.name.as_deref().unwrap_or("")
                && sp.protocol.as_deref().unwrap_or("TCP") == "TCP"
        });
        let target = match (resolved.and_then(|sp| sp.port), &p.target_port) {
            (Some(n), _) => i64::from(n),
            (None, Some(IntOrString::Int(n))) => i64::from(*n),
            (None, None) => i64::from(p.port),
            (None, Some(IntOrString::String(named))) => {
                skipped.push(format!(
                    "service {ns}/{name} port {}: target port {named:?} is not resolved by any EndpointSlice yet",
                    p.port
                ));
                continue;
            }
        };
        ports.push(PortDoc {
            port: i64::from(p.port),
            target_port: Some(target),
            protocol: "TCP".into(),
            // The kernel balances connections: a kernel-mode port stays tcp.
            app_protocol: app_protocol(p.app_protocol.as_deref(), p.name.as_deref())
                .filter(|_| mode == "proxy")
                .map(str::to_owned),
        });
    }
    if ports.is_empty() {
        return None;
    }

    let mut endpoints: BTreeMap<IpAddr, EndpointDoc> = BTreeMap::new();
    let mut outside = 0;
    for e in own.iter().flat_map(|sl| sl.endpoints.iter()) {
        let Some(node) = e.node_name.as_deref().filter(|n| nodes.contains_key(n)) else {
            outside += 1;
            continue;
        };
        let c = e.conditions.as_ref();
        // The API: a missing `ready` means ready, a missing `terminating` not.
        let ready = c.and_then(|c| c.ready).unwrap_or(true);
        let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
        let weight = if terminating {
            0
        } else if ready {
            pod_weight(e.target_ref.as_ref(), ns, pods, skipped)
        } else {
            continue;
        };
        // An endpoint of a family the Service has no VIP of takes no
        // connection (the slice controller writes none such).
        let ips = e.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok());
        for ip in ips.filter(|ip| vips.get(Family::of(*ip)).is_some()) {
            let doc = EndpointDoc { ip: ip.to_string(), node: node.to_owned(), weight, priority: 0 };
            // The same address in two slices: the one that takes traffic wins.
            let keep = endpoints.get(&ip).is_none_or(|old| old.weight < weight);
            if keep {
                endpoints.insert(ip, doc);
            }
        }
    }
    if endpoints.is_empty() && outside > 0 {
        skipped.push(format!(
            "service {ns}/{name}: its endpoints are not pods on a node; left to the cluster's own routing"
        ));
        return None;
    }
    let http = http_policy(s.metadata.annotations.as_ref(), &ports, &format!("service {ns}/{name}"), skipped);
    let (vip, vip_list) = doc_addresses(&vips);
    Some(ServiceDoc {
        http,
        name: name.to_owned(),
        namespace: ns.to_owned(),
        vip,
        vips: vip_list,
        mode: mode.to_owned(),
        ports,
        endpoints: endpoints.into_values().collect(),
        health_check: Some(health_check(s.metadata.annotations.as_ref(), &format!("service {ns}/{name}"), skipped)),
        fail_open: true,
        connect_timeout: None,
        retries: None,
        retry_budget: None,
        mtls: (!meshed.contains(ns)).then(|| "disabled".to_owned()),
        authorization: None,
        access_log: access_log(s.metadata.annotations.as_ref(), &format!("service {ns}/{name}"), skipped),
    })
}

/// The endpoint pod's `mesh.io/weight`, 1 when absent or invalid.
fn pod_weight(
    target: Option<&k8s_openapi::api::core::v1::ObjectReference>,
    ns: &str,
    pods: &BTreeMap<(&str, &str), &Pod>,
    skipped: &mut Vec<String>,
) -> i64 {
    let Some(pod) = target
        .filter(|r| r.kind.as_deref() == Some("Pod"))
        .and_then(|r| pods.get(&(r.namespace.as_deref().unwrap_or(ns), r.name.as_deref()?)))
    else {
        return 1;
    };
    match pod.metadata.annotations.as_ref().and_then(|a| a.get(WEIGHT_ANNOTATION)) {
        None => 1,
        Some(v) => match v.trim().parse::<u16>() {
            Ok(w) => i64::from(w),
            Err(_) => {
                let who = pod.metadata.name.as_deref().unwrap_or_default();
                skipped.push(format!(
                    "pod {ns}/{who}: {WEIGHT_ANNOTATION}: {v:?} is not a weight from 0 to 65535; using 1"
                ));
                1
            }
        },
    }
}

#[cfg(test)]
mod tests;
