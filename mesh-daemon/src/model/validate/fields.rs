//! Checks of one node, workload or service of a document: each bad
//! field reported with its path.

use super::*;
use crate::model::AccessLog;

pub(super) fn nodes(
    e: &mut Errors,
    doc: &Document,
    state: &mut State,
    node_names: &mut HashSet<NodeName>,
    node_addrs: &mut HashMap<IpAddr, usize>,
) {
    for (i, n) in doc.nodes.iter().enumerate() {
        let p = format!("nodes[{i}]");
        let name = e.take(|| format!("{p}.name"), NodeName::parse(&n.name));
        if let Some(name) = &name {
            if !node_names.insert(name.clone()) {
                e.push(format!("{p}.name"), format!("node \"{name}\" is listed twice"));
            }
        }
        let addrs = addresses(e, &p, ("address", &n.address), ("addresses", &n.addresses));
        for a in addrs.iter().flat_map(|a| a.iter()) {
            node_addrs.entry(a).or_insert(i);
        }
        if let (Some(name), Some(addresses)) = (name, addrs) {
            state.nodes.push(Node { name, addresses });
        }
    }
}

/// The node list's name `s` (shared, not a copy), or an error.
fn known_node(e: &mut Errors, node_names: &HashSet<NodeName>, path: &dyn Fn() -> String, s: &str) -> Option<NodeName> {
    if let Some(n) = node_names.get(s) {
        return Some(n.clone());
    }
    e.take(path, NodeName::parse(s))?;
    e.push(path(), format!("node {s:?} is not in `nodes`; add it there or fix the name"));
    None
}

pub(super) fn workloads(
    e: &mut Errors,
    doc: &Document,
    state: &mut State,
    node_names: &HashSet<NodeName>,
    workload_ips: &mut HashMap<IpAddr, usize>,
) {
    // Each valid node's addresses, with its index in the document (the
    // state lists only the nodes that validated).
    let at: HashMap<&str, usize> = doc.nodes.iter().enumerate().map(|(i, n)| (n.name.as_str(), i)).collect();
    let node_addrs: HashMap<&NodeName, (usize, Addresses)> = state
        .nodes
        .iter()
        .map(|n| (&n.name, (at.get(n.name.as_str()).copied().unwrap_or_default(), n.addresses)))
        .collect();
    for (i, w) in doc.workloads.iter().enumerate() {
        let p = format!("workloads[{i}]");
        let name = e.take(|| format!("{p}.name"), Name::parse(&w.name));
        let namespace = e.take(|| format!("{p}.namespace"), Name::parse(&w.namespace));
        let sa = e.take(|| format!("{p}.serviceAccount"), Name::parse(&w.service_account));
        let node = known_node(e, node_names, &|| format!("{p}.node"), &w.node);
        let ips = addresses(e, &p, ("ip", &w.ip), ("ips", &w.ips));
        let field = if w.ips.is_empty() { "ip" } else { "ips" };
        for ip in ips.iter().flat_map(|a| a.iter()) {
            if let Some(first) = workload_ips.insert(ip, i) {
                e.push(format!("{p}.{field}"), format!("{ip} is already the address of workloads[{first}]"));
                workload_ips.insert(ip, first);
            }
            // Its redirected connections go to the proxy at the node's
            // address of the family they dial.
            if let Some((n, node)) = node.as_ref().and_then(|n| node_addrs.get(n).map(|(i, a)| (*i, (n, a)))) {
                let family = Family::of(ip);
                if node.1.get(family).is_none() {
                    e.push(
                        format!("{p}.{field}"),
                        format!(
                            "{ip} is {family}, but node {} (nodes[{n}]) has no {family} address: add one to its `addresses`, or give the pod none of that family",
                            node.0
                        ),
                    );
                }
            }
        }
        let netns = match (&w.netns, w.pid) {
            (Some(path), None) if path.starts_with('/') => Some(NetnsRef::Path(PathBuf::from(path))),
            (Some(path), None) => {
                e.push(format!("{p}.netns"), format!("{path:?} is not an absolute path"));
                None
            }
            (None, Some(pid)) => e.take(
                || format!("{p}.pid"),
                u32::try_from(pid)
                    .ok()
                    .filter(|p| *p > 0)
                    .map(NetnsRef::Pid)
                    .ok_or_else(|| invalid!("{pid} is not a process id")),
            ),
            (None, None) => {
                e.push(p.clone(), "give `netns` (a path) or `pid` to find the pod's network namespace");
                None
            }
            (Some(_), Some(_)) => {
                e.push(p.clone(), "give either `netns` or `pid`, not both");
                None
            }
        };
        if let (Some(name), Some(namespace), Some(service_account), Some(node), Some(ips), Some(netns)) =
            (name, namespace, sa, node, ips, netns)
        {
            for (k, v) in &w.labels {
                if !label_ok(k) || v.len() > 63 || !(v.is_empty() || label_ok(v)) {
                    e.push(
                        format!("{p}.labels[{k}]"),
                        format!("{k:?}: {v:?} is not a label: letters, digits, '-', '_', '.', '/'"),
                    );
                }
            }
            let labels = w.labels.clone();
            state.workloads.push(Workload { name, namespace, service_account, node, ips, netns, labels });
        }
    }
}

/// One service on its own; the checks across services are the caller's.
pub(super) fn service(e: &mut Errors, i: usize, s: &ServiceDoc, node_names: &HashSet<NodeName>) -> Option<Service> {
    let errors_before = e.0.len();
    let p = format!("services[{i}]");
    let name = e.take(|| format!("{p}.name"), Name::parse(&s.name));
    let namespace = e.take(|| format!("{p}.namespace"), Name::parse(&s.namespace));
    let vips = addresses(e, &p, ("vip", &s.vip), ("vips", &s.vips));
    let mode = match s.mode.as_str() {
        "proxy" => Some(Mode::Proxy),
        "kernel" => Some(Mode::Kernel),
        other => {
            e.push(format!("{p}.mode"), format!("{other:?} is not a mode: use \"proxy\" or \"kernel\""));
            None
        }
    };
    if s.ports.is_empty() {
        e.push(format!("{p}.ports"), "a service needs at least one port");
    }
    // Exact capacities: at 100 000 endpoints, growth slack is megabytes.
    let mut ports = Vec::with_capacity(s.ports.len());
    let mut seen_ports = HashSet::new();
    for (j, port) in s.ports.iter().enumerate() {
        let pp = format!("{p}.ports[{j}]");
        let number = e.take(|| format!("{pp}.port"), Port::parse(port.port));
        let target = e.take(|| format!("{pp}.targetPort"), Port::parse(port.target_port.unwrap_or(port.port)));
        if port.protocol != "TCP" {
            e.push(format!("{pp}.protocol"), format!("{:?} is not supported: use \"TCP\"", port.protocol));
        }
        if let Some(number) = number {
            if !seen_ports.insert(number) {
                e.push(format!("{pp}.port"), format!("port {number} is listed twice"));
            }
        }
        let app_protocol =
            e.take(|| format!("{pp}.appProtocol"), AppProtocol::parse(port.app_protocol.as_deref().unwrap_or("tcp")));
        if let (Some(app), Some(Mode::Kernel)) = (app_protocol, mode) {
            if app.is_requests() {
                e.push(
                    format!("{pp}.appProtocol"),
                    format!(
                        "{:?} needs {p}.mode: proxy, not kernel: the kernel balances connections and cannot see requests",
                        app.as_str()
                    ),
                );
            }
        }
        if let (Some(port), Some(target_port), Some(app_protocol)) = (number, target, app_protocol) {
            ports.push(ServicePort { port, target_port, app_protocol });
        }
    }
    let mut endpoints = Vec::with_capacity(s.endpoints.len());
    let mut seen_ips = HashSet::new();
    for (j, ep) in s.endpoints.iter().enumerate() {
        let pp = || format!("{p}.endpoints[{j}]");
        let ip = e.take(|| format!("{}.ip", pp()), parse_ip(&ep.ip));
        if let Some(ip) = ip {
            if !seen_ips.insert(ip) {
                e.push(format!("{}.ip", pp()), format!("endpoint {ip} is listed twice"));
            }
            let family = Family::of(ip);
            if let Some(vips) = vips.filter(|v| v.get(family).is_none()) {
                e.push(
                    format!("{}.ip", pp()),
                    format!("{ip} is {family}, but the service has no {family} VIP ({vips}): a VIP's connections go to endpoints of its family; add a {family} VIP to `vips`, or remove the endpoint"),
                );
            }
        }
        let node = known_node(e, node_names, &|| format!("{}.node", pp()), &ep.node);
        let weight = e.take(
            || format!("{}.weight", pp()),
            match ep.weight {
                w if w < 0 => Err(invalid!("weight {w} is negative: use 0 (drain) to {}", Weight::MAX)),
                w if w > Weight::MAX => Err(invalid!("weight {w} is above the maximum {}", Weight::MAX)),
                w => Ok(Weight(w as u16)),
            },
        );
        let priority = e.take(
            || format!("{}.priority", pp()),
            u8::try_from(ep.priority)
                .map_err(|_| invalid!("priority {} is not in 0..255 (0 is the most preferred)", ep.priority)),
        );
        if let (Some(ip), Some(node), Some(weight), Some(priority)) = (ip, node, weight, priority) {
            endpoints.push(Endpoint { ip, node, weight, priority });
        }
    }
    let health_check = health_check(e, &p, s.health_check.as_ref());
    let connect_timeout = e.take(
        || format!("{p}.connectTimeout"),
        bounded_duration(
            s.connect_timeout.as_deref().unwrap_or("1s"),
            Duration::from_millis(10),
            Duration::from_secs(60),
        ),
    );
    let retry_budget = e.take(
        || format!("{p}.retryBudget"),
        bounded_duration(
            s.retry_budget.as_deref().unwrap_or("5s"),
            Duration::from_millis(10),
            Duration::from_secs(300),
        ),
    );
    let mtls = match s.mtls.as_deref().unwrap_or("required") {
        "required" => Some(true),
        "disabled" => Some(false),
        other => {
            e.push(format!("{p}.mtls"), format!("{other:?} is not an mTLS mode: use \"required\" or \"disabled\""));
            None
        }
    };
    let authorization = s.authorization.as_ref().map(|a| {
        let identities: Vec<_> = a
            .identities
            .iter()
            .enumerate()
            .filter_map(|(j, id)| {
                let r = Identity::parse(id).map_err(|x| Invalid(x.to_string()));
                e.take(|| format!("{p}.authorization.identities[{j}]"), r)
            })
            .collect();
        let namespaces: Vec<_> = a
            .namespaces
            .iter()
            .enumerate()
            .filter_map(|(j, n)| e.take(|| format!("{p}.authorization.namespaces[{j}]"), Name::parse(n)))
            .collect();
        Authorization { identities, namespaces }
    });
    let retries = e.take(
        || format!("{p}.retries"),
        match s.retries.unwrap_or(3) {
            r @ 0..=10 => Ok(r as u32),
            r => Err(invalid!("{r} retries are not in 0..10")),
        },
    );
    let http = super::http::validate(e, &p, s.http.as_ref(), &ports);
    let access_log =
        e.take(|| format!("{p}.accessLog"), s.access_log.as_deref().map_or(Ok(AccessLog::ON), AccessLog::parse));
    if e.0.len() != errors_before {
        return None;
    }
    Some(Service {
        name: name?,
        namespace: namespace?,
        vips: vips?,
        mode: mode?,
        ports,
        endpoints,
        health_check: health_check?,
        fail_open: s.fail_open,
        connect_timeout: connect_timeout?,
        retries: retries?,
        retry_budget: retry_budget?,
        mtls: mtls?,
        authorization,
        http: http?,
        access_log: access_log?,
    })
}

/// A label key or value, as Kubernetes allows them (a key may have a
/// `prefix/`).
fn label_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
}
