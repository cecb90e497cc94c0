//! Document -> State, collecting every error with the path of its field.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::chunked::CHUNK;
use super::errors::{invalid, Errors};

mod index;
use super::*;
use index::holds;
pub use index::Index;

fn bounded_duration(s: &str, min: Duration, max: Duration) -> Result<Duration, Invalid> {
    let d = parse_duration(s)?;
    if d < min || d > max {
        return Err(invalid!("{s} is not between {min:?} and {max:?}"));
    }
    Ok(d)
}

/// `Some(None)`: checks off; `None`: an error was recorded.
fn health_check(e: &mut Errors, service: &str, doc: Option<&HealthCheckDoc>) -> Option<Option<HealthCheck>> {
    let p = format!("{service}.healthCheck");
    let default =
        HealthCheckDoc { protocol: "tcp".into(), path: None, interval: None, timeout: None, rise: None, fall: None };
    let doc = doc.unwrap_or(&default);
    let kind = match (doc.protocol.as_str(), &doc.path) {
        ("none", _) => return Some(None),
        ("tcp", None) => Some(CheckKind::Tcp),
        ("tcp", Some(_)) => {
            e.push(format!("{p}.path"), "a tcp check has no path; use protocol: http");
            None
        }
        ("http", Some(path)) if path.starts_with('/') => Some(CheckKind::Http(path.clone())),
        ("http", Some(path)) => {
            e.push(format!("{p}.path"), format!("{path:?} must start with '/'"));
            None
        }
        ("http", None) => Some(CheckKind::Http("/".into())),
        (other, _) => {
            e.push(format!("{p}.protocol"), format!("{other:?} is not a check: use \"tcp\", \"http\" or \"none\""));
            None
        }
    };
    let interval = e.take(
        || format!("{p}.interval"),
        bounded_duration(
            doc.interval.as_deref().unwrap_or("5s"),
            Duration::from_millis(100),
            Duration::from_secs(3600),
        ),
    );
    let timeout = e.take(
        || format!("{p}.timeout"),
        bounded_duration(doc.timeout.as_deref().unwrap_or("1s"), Duration::from_millis(10), Duration::from_secs(60)),
    );
    if let (Some(i), Some(t)) = (interval, timeout) {
        if t > i {
            e.push(format!("{p}.timeout"), format!("{t:?} is longer than the interval {i:?}"));
            return None;
        }
    }
    let count = |e: &mut Errors, field: &str, v: Option<i64>, default: u32| {
        e.take(
            || format!("{p}.{field}"),
            match v.unwrap_or(i64::from(default)) {
                n @ 1..=100 => Ok(n as u32),
                n => Err(invalid!("{n} is not in 1..100")),
            },
        )
    };
    let rise = count(e, "rise", doc.rise, 2);
    let fall = count(e, "fall", doc.fall, 3);
    Some(Some(HealthCheck { kind: kind?, interval: interval?, timeout: timeout?, rise: rise?, fall: fall? }))
}

fn ipv4(s: &str) -> Result<Ipv4Addr, Invalid> {
    s.parse().map_err(|_| invalid!("{s:?} is not an IPv4 address"))
}

/// What a write changed, service by service.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    /// Everything was validated (the nodes or workloads changed, or there
    /// was no state before): readers rebuild what they derive.
    pub whole: bool,
    /// Indices in the new state of the services that are new or changed.
    pub changed: Vec<usize>,
    /// The services of the state before that are gone or were replaced,
    /// with their index there.
    pub removed: Vec<(usize, Arc<Service>)>,
    /// The services kept are in the order they were: the new list is the
    /// old one without `removed`, with `changed` put in at their places.
    pub in_order: bool,
}

/// A document validated, with what it changed.
pub struct Validated {
    pub state: State,
    pub changes: Changes,
    /// What the write does to the index of the state before.
    pub index_change: Index,
}

/// `doc` validated. With `prev` (the accepted document, its state and
/// index), a service that is the same `Arc` as one of the previous
/// document is taken as it was, and only the others are checked, against
/// the index: a write costs what it changes. Without it, or when the
/// nodes or the workloads changed, every service is checked.
pub(super) fn validate(
    prev: Option<(&Document, &State, &Index)>,
    doc: &Document,
    table_size: u32,
) -> Result<Validated, ValidationErrors> {
    let mut e = Errors::default();
    let mut state = State::default();
    let prev = prev.filter(|(d, _, _)| d.nodes == doc.nodes && d.workloads == doc.workloads);
    let empty = Index::default();
    let base = prev.map_or(&empty, |(_, _, i)| i);

    let mut node_names = HashSet::new();
    // First holder of each address, for refusing a VIP that shadows it.
    let mut node_addrs = HashMap::new();
    let mut workload_ips = HashMap::new();
    match prev {
        Some((_, p, _)) => {
            state.nodes = p.nodes.clone();
            state.workloads = p.workloads.clone();
            for (i, n) in p.nodes.iter().enumerate() {
                node_names.insert(n.name.clone());
                node_addrs.entry(n.address).or_insert(i);
            }
            for (i, w) in p.workloads.iter().enumerate() {
                workload_ips.entry(w.ip).or_insert(i);
            }
        }
        None => {
            nodes(&mut e, doc, &mut state, &mut node_names, &mut node_addrs);
            workloads(&mut e, doc, &mut state, &node_names, &mut workload_ips);
        }
    }

    // Which services are the same as before: by pointer.
    let mut change = Index::default();
    let mut changes = Changes { whole: prev.is_none(), ..Changes::default() };
    // Runs of services kept from the state before: (index in `doc`,
    // index before, length).
    let mut runs: Vec<(usize, usize, usize)> = Vec::new();
    let mut run = |i: usize, j: usize, n: usize| match runs.last_mut() {
        Some(r) if r.0 + r.2 == i && r.1 + r.2 == j => r.2 += n,
        _ => runs.push((i, j, n)),
    };
    if let Some((pd, ps, _)) = prev {
        // Walk both lists together: an edit replaces, removes or adds a
        // few services and keeps the order, so a chunk of services shared
        // with the list before is passed over whole, and the rest costs
        // one pointer comparison per service. A service found out of step
        // is looked up among all the old ones (built once, only then).
        let (new, old) = (&doc.services, &pd.services);
        let same = |i: usize, j: usize| i < new.len() && j < old.len() && Arc::ptr_eq(&new[i], &old[j]);
        let mut by_ptr: Option<HashMap<*const ServiceDoc, usize>> = None;
        let mut kept = vec![false; old.len()];
        let mut last = None;
        changes.in_order = true;
        let (mut i, mut j) = (0, 0);
        while i < new.len() {
            if i.is_multiple_of(CHUNK) && i == j {
                let c = i / CHUNK;
                if let (Some(a), Some(b)) = (new.chunks().get(c), old.chunks().get(c)) {
                    if Arc::ptr_eq(a, b) {
                        let n = a.len();
                        kept[j..j + n].fill(true);
                        changes.in_order &= last.is_none_or(|l| l < j);
                        run(i, j, n);
                        last = Some(j + n - 1);
                        (i, j) = (i + n, j + n);
                        continue;
                    }
                }
            }
            let found = if same(i, j) {
                Some(j)
            } else if same(i, j + 1) {
                Some(j + 1)
            } else if same(i + 1, j) || same(i + 1, j + 1) || j >= old.len() || i + 1 == new.len() {
                None
            } else {
                let map =
                    by_ptr.get_or_insert_with(|| old.iter().enumerate().map(|(j, s)| (Arc::as_ptr(s), j)).collect());
                map.get(&Arc::as_ptr(&new[i])).copied()
            };
            match found.filter(|f| !kept[*f]) {
                Some(f) => {
                    kept[f] = true;
                    run(i, f, 1);
                    changes.in_order &= last.is_none_or(|l| l < f);
                    last = Some(f);
                    j = f + 1;
                }
                // Replaced in place: the old one at this step is gone.
                None if same(i + 1, j + 1) => j += 1,
                None => {}
            }
            i += 1;
        }
        for (j, k) in kept.iter().enumerate() {
            if !k {
                change.count(&ps.services[j], -1, table_size);
                changes.removed.push((j, ps.services[j].clone()));
            }
        }
    }
    // Services checked here (index in the state, in the document), for
    // the checks that need all of them first.
    let mut checked = Vec::new();
    let mut runs = runs.into_iter().peekable();
    let mut i = 0;
    while i < doc.services.len() {
        if let (Some(&(_, j, n)), Some((_, ps, _))) = (runs.peek().filter(|r| r.0 == i), prev) {
            runs.next();
            // Whole chunks of the state before where they were, shared.
            let mut k = 0;
            while k < n {
                let (ni, oi) = (i + k, j + k);
                let chunk =
                    ps.services.chunks().get(oi / CHUNK).filter(|c| {
                        ni.is_multiple_of(CHUNK) && ni == oi && state.services.len() == ni && c.len() <= n - k
                    });
                match chunk {
                    Some(c) => {
                        state.services.push_chunk(c);
                        k += c.len();
                    }
                    None => {
                        state.services.push(ps.services[oi].clone());
                        k += 1;
                    }
                }
            }
            i += n;
            continue;
        }
        let s = &doc.services[i];
        let Some(svc) = service(&mut e, i, s, &node_names) else {
            i += 1;
            continue;
        };
        let p = format!("services[{i}]");
        let key = svc.key();
        if holds(&base.names, &change.names, &key) {
            let first = first_service(doc, i, |o| o.namespace == s.namespace && o.name == s.name);
            e.push(format!("{p}.name"), format!("service {key} is already services[{first}]"));
        }
        for (jp, port) in svc.ports.iter().enumerate() {
            if holds(&base.addresses, &change.addresses, &(svc.vip, port.port.0)) {
                let first = first_service(doc, i, |o| {
                    o.vip.parse() == Ok(svc.vip) && o.ports.iter().any(|x| x.port == i64::from(port.port.0))
                });
                e.push(
                    format!("{p}.ports[{jp}].port"),
                    format!("{}:{} is already served by services[{first}]", svc.vip, port.port),
                );
            }
        }
        change.count(&svc, 1, table_size);
        changes.changed.push(i);
        checked.push((state.services.len(), i));
        state.services.push(Arc::new(svc));
        i += 1;
    }

    // connect4 rewrites every connect to a VIP: one that is also a pod's or
    // a node's address would capture ordinary traffic to it.
    let shadow = |vip: Ipv4Addr, holder: String| {
        FieldError {
            path: String::new(),
            message: format!("{vip} is the address of {holder}: a VIP must be an address no node or pod has, or connections to it would be captured; choose another VIP"),
        }
    };
    let endpoint_holder = |ip: Ipv4Addr| -> String {
        for (si, s) in doc.services.iter().enumerate() {
            if let Some(ei) = s.endpoints.iter().position(|x| x.ip.parse() == Ok(ip)) {
                return format!("an endpoint of {} (services[{si}].endpoints[{ei}])", s.name);
            }
        }
        "an endpoint".into()
    };
    let mut blamed = HashSet::new();
    for &(k, i) in &checked {
        let s = &state.services[k];
        let holder = if let Some(n) = node_addrs.get(&s.vip) {
            format!("node {} (nodes[{n}])", state.nodes[*n].name)
        } else if let Some(w) = workload_ips.get(&s.vip) {
            let wl = &state.workloads[*w];
            format!("workload {}/{} (workloads[{w}])", wl.namespace, wl.name)
        } else if holds(&base.endpoint_ips, &change.endpoint_ips, &s.vip) {
            endpoint_holder(s.vip)
        } else {
            continue;
        };
        blamed.insert(s.vip);
        e.0.push(FieldError { path: format!("services[{i}].vip"), ..shadow(s.vip, holder) });
    }
    // An endpoint added at the VIP of a service this write did not check.
    if prev.is_some() {
        for &(k, _) in &checked {
            for ep in &state.services[k].endpoints {
                if blamed.contains(&ep.ip) || !holds(&base.vips, &change.vips, &ep.ip) {
                    continue;
                }
                if let Some(i) = doc.services.iter().position(|o| o.vip.parse() == Ok(ep.ip)) {
                    blamed.insert(ep.ip);
                    e.0.push(FieldError {
                        path: format!("services[{i}].vip"),
                        ..shadow(ep.ip, endpoint_holder(ep.ip))
                    });
                }
            }
        }
    }

    if e.0.is_empty() {
        Ok(Validated { state, changes, index_change: change })
    } else {
        Err(ValidationErrors(e.0))
    }
}

/// The first service of `doc` other than `i` that `is` finds.
fn first_service(doc: &Document, i: usize, is: impl Fn(&ServiceDoc) -> bool) -> usize {
    doc.services.iter().enumerate().position(|(j, o)| j != i && is(o)).unwrap_or(i)
}

fn nodes(
    e: &mut Errors,
    doc: &Document,
    state: &mut State,
    node_names: &mut HashSet<NodeName>,
    node_addrs: &mut HashMap<Ipv4Addr, usize>,
) {
    for (i, n) in doc.nodes.iter().enumerate() {
        let p = format!("nodes[{i}]");
        let name = e.take(|| format!("{p}.name"), NodeName::parse(&n.name));
        if let Some(name) = &name {
            if !node_names.insert(name.clone()) {
                e.push(format!("{p}.name"), format!("node \"{name}\" is listed twice"));
            }
        }
        let address = e.take(|| format!("{p}.address"), ipv4(&n.address));
        if let Some(a) = address {
            node_addrs.entry(a).or_insert(i);
        }
        if let (Some(name), Some(address)) = (name, address) {
            state.nodes.push(Node { name, address });
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

fn workloads(
    e: &mut Errors,
    doc: &Document,
    state: &mut State,
    node_names: &HashSet<NodeName>,
    workload_ips: &mut HashMap<Ipv4Addr, usize>,
) {
    for (i, w) in doc.workloads.iter().enumerate() {
        let p = format!("workloads[{i}]");
        let name = e.take(|| format!("{p}.name"), Name::parse(&w.name));
        let namespace = e.take(|| format!("{p}.namespace"), Name::parse(&w.namespace));
        let sa = e.take(|| format!("{p}.serviceAccount"), Name::parse(&w.service_account));
        let node = known_node(e, node_names, &|| format!("{p}.node"), &w.node);
        let ip = e.take(|| format!("{p}.ip"), ipv4(&w.ip));
        if let Some(ip) = ip {
            if let Some(first) = workload_ips.insert(ip, i) {
                e.push(format!("{p}.ip"), format!("{ip} is already the address of workloads[{first}]"));
                workload_ips.insert(ip, first);
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
        if let (Some(name), Some(namespace), Some(service_account), Some(node), Some(ip), Some(netns)) =
            (name, namespace, sa, node, ip, netns)
        {
            state.workloads.push(Workload { name, namespace, service_account, node, ip, netns });
        }
    }
}

/// One service on its own; the checks across services are the caller's.
fn service(e: &mut Errors, i: usize, s: &ServiceDoc, node_names: &HashSet<NodeName>) -> Option<Service> {
    let errors_before = e.0.len();
    let p = format!("services[{i}]");
    let name = e.take(|| format!("{p}.name"), Name::parse(&s.name));
    let namespace = e.take(|| format!("{p}.namespace"), Name::parse(&s.namespace));
    let vip = e.take(|| format!("{p}.vip"), ipv4(&s.vip));
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
        let ip = e.take(|| format!("{}.ip", pp()), ipv4(&ep.ip));
        if let Some(ip) = ip {
            if !seen_ips.insert(ip) {
                e.push(format!("{}.ip", pp()), format!("endpoint {ip} is listed twice"));
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
    if e.0.len() != errors_before {
        return None;
    }
    Some(Service {
        name: name?,
        namespace: namespace?,
        vip: vip?,
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
    })
}

#[cfg(test)]
mod tests;
