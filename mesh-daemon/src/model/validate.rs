//! Document -> State, collecting every error with the path of its field.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::chunked::CHUNK;
use super::errors::{invalid, Errors};
use super::*;

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

/// Counts of what the services of a state hold, for the checks that span
/// services (names and `vip:port`s are unique, a VIP is no endpoint's
/// address) and for the slot tables they need: kept for the accepted
/// state, so that a write checks only the services it changes against it.
/// The same shape, signed, is the change a write makes to it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Index {
    /// `namespace/name`.
    names: HashMap<String, i64>,
    addresses: HashMap<(Ipv4Addr, u16), i64>,
    vips: HashMap<Ipv4Addr, i64>,
    endpoint_ips: HashMap<Ipv4Addr, i64>,
    /// Endpoint addresses (at each target port) in use.
    endpoint_addrs: HashMap<SocketAddrV4, i64>,
    /// Service ports: one `SERVICES` entry each.
    pub(super) ports: i64,
    /// Kernel-mode tables at their largest, and how many tables have each
    /// largest size (for the one rewritten beside the rest).
    pub(super) slots: i64,
    pub(super) bounds: BTreeMap<usize, i64>,
}

/// Whether `k` is held after `change`.
fn holds<K: std::hash::Hash + Eq>(base: &HashMap<K, i64>, change: &HashMap<K, i64>, k: &K) -> bool {
    base.get(k).copied().unwrap_or(0) + change.get(k).copied().unwrap_or(0) > 0
}

fn bump<K: std::hash::Hash + Eq>(m: &mut HashMap<K, i64>, k: K, by: i64) {
    let n = m.entry(k).or_default();
    *n += by;
}

impl Index {
    /// The index of `state`'s services.
    pub fn of(state: &State, table_size: u32) -> Self {
        let mut i = Index::default();
        for s in &state.services {
            i.count(s, 1, table_size);
        }
        i
    }

    /// Adds (`by` 1) or takes away (-1) one service.
    fn count(&mut self, s: &Service, by: i64, table_size: u32) {
        bump(&mut self.names, s.key(), by);
        bump(&mut self.vips, s.vip, by);
        for p in &s.ports {
            bump(&mut self.addresses, (s.vip, p.port.0), by);
        }
        for e in &s.endpoints {
            bump(&mut self.endpoint_ips, e.ip, by);
        }
        let mut targets: Vec<Port> = s.ports.iter().map(|p| p.target_port).collect();
        targets.sort_unstable();
        targets.dedup();
        for t in targets {
            for e in &s.endpoints {
                bump(&mut self.endpoint_addrs, e.addr(t), by);
            }
        }
        self.ports += by * s.ports.len() as i64;
        if s.mode == Mode::Kernel {
            let weights: Vec<u16> = s.endpoints.iter().map(|e| e.weight.0).collect();
            let bound = super::slots::table_bound(&weights, table_size);
            self.slots += by * (s.ports.len() * bound) as i64;
            *self.bounds.entry(bound).or_default() += by * s.ports.len() as i64;
        }
    }

    /// Applies a change made by [`validate`] (after the write was accepted).
    pub fn apply(&mut self, change: &Index) {
        fn merge<K: std::hash::Hash + Eq + Clone>(to: &mut HashMap<K, i64>, from: &HashMap<K, i64>) {
            for (k, by) in from {
                let n = to.entry(k.clone()).or_default();
                *n += by;
                if *n == 0 {
                    to.remove(k);
                }
            }
        }
        merge(&mut self.names, &change.names);
        merge(&mut self.addresses, &change.addresses);
        merge(&mut self.vips, &change.vips);
        merge(&mut self.endpoint_ips, &change.endpoint_ips);
        merge(&mut self.endpoint_addrs, &change.endpoint_addrs);
        self.ports += change.ports;
        self.slots += change.slots;
        for (b, by) in &change.bounds {
            let n = self.bounds.entry(*b).or_default();
            *n += by;
            if *n == 0 {
                self.bounds.remove(b);
            }
        }
    }

    /// Whether a service uses `addr` as an endpoint address.
    pub fn uses(&self, addr: SocketAddrV4) -> bool {
        self.endpoint_addrs.contains_key(&addr)
    }

    /// The largest table after `change`.
    pub(super) fn largest_with(&self, change: &Index) -> usize {
        let sizes = self.bounds.keys().chain(change.bounds.keys());
        sizes
            .filter(|b| self.bounds.get(b).copied().unwrap_or(0) + change.bounds.get(b).copied().unwrap_or(0) > 0)
            .copied()
            .max()
            .unwrap_or(0)
    }
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
mod tests {
    use super::*;
    use crate::model::parse_document;

    const GOOD: &str = r#"
nodes:
  - { name: node-a, address: 172.18.0.2 }
  - { name: node-b, address: 172.18.0.3 }
workloads:
  - { name: client, namespace: default, serviceAccount: client, node: node-a, ip: 10.244.1.2, netns: /var/run/netns/c }
  - { name: other, node: node-b, ip: 10.244.2.2, pid: 42 }
services:
  - name: web
    vip: 10.96.0.10
    ports: [ { port: 80, targetPort: 8080 }, { port: 443 } ]
    endpoints:
      - { ip: 10.244.1.3, node: node-a, weight: 3 }
      - { ip: 10.244.2.4, node: node-b }
"#;

    fn good() -> Document {
        parse_document(GOOD).unwrap()
    }

    /// Applies `edit` to the good document and returns the error messages.
    fn errors(edit: impl FnOnce(&mut Document)) -> Vec<String> {
        let mut d = good();
        edit(&mut d);
        match State::from_document(&d) {
            Ok(_) => panic!("document should be rejected"),
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        }
    }

    fn assert_error(edit: impl FnOnce(&mut Document), expected: &str) {
        let errs = errors(edit);
        assert!(errs.iter().any(|e| e == expected), "expected {expected:?} in {errs:#?}");
    }

    #[test]
    fn good_document_is_accepted_with_defaults() {
        let s = State::from_document(&good()).unwrap();
        assert_eq!(s.nodes.len(), 2);
        assert_eq!(s.workloads[1].namespace.as_str(), "default");
        assert_eq!(s.workloads[1].netns, NetnsRef::Pid(42));
        let web = &s.services[0];
        assert_eq!(web.mode, Mode::Proxy);
        assert_eq!(web.ports[0].target_port, Port(8080));
        assert_eq!(web.ports[1].target_port, Port(443), "targetPort defaults to port");
        assert_eq!(web.endpoints[1].weight, Weight(1), "weight defaults to 1");
    }

    #[test]
    fn node_rules() {
        assert_error(|d| d.nodes[0].address = "x".into(), r#"nodes[0].address: "x" is not an IPv4 address"#);
        assert_error(|d| d.nodes[1].name = "node-a".into(), r#"nodes[1].name: node "node-a" is listed twice"#);
        let e = errors(|d| d.nodes[0].name = "Node_A".into());
        assert!(e[0].starts_with("nodes[0].name: \"Node_A\" is not a valid node name"), "{e:?}");
    }

    #[test]
    fn workload_rules() {
        assert_error(
            |d| d.workloads[0].ip = "10.0.0.300".into(),
            r#"workloads[0].ip: "10.0.0.300" is not an IPv4 address"#,
        );
        assert_error(
            |d| d.workloads[1].ip = "10.244.1.2".into(),
            "workloads[1].ip: 10.244.1.2 is already the address of workloads[0]",
        );
        assert_error(
            |d| d.workloads[0].node = "node-z".into(),
            r#"workloads[0].node: node "node-z" is not in `nodes`; add it there or fix the name"#,
        );
        assert_error(
            |d| d.workloads[0].netns = Some("relative".into()),
            r#"workloads[0].netns: "relative" is not an absolute path"#,
        );
        assert_error(|d| d.workloads[1].pid = Some(0), "workloads[1].pid: 0 is not a process id");
        assert_error(
            |d| d.workloads[1].pid = None,
            "workloads[1]: give `netns` (a path) or `pid` to find the pod's network namespace",
        );
        assert_error(|d| d.workloads[0].pid = Some(7), "workloads[0]: give either `netns` or `pid`, not both");
        assert!(errors(|d| d.workloads[0].name = "-x".into())[0].starts_with("workloads[0].name: "));
        assert!(errors(|d| d.workloads[0].namespace = "A".into())[0].starts_with("workloads[0].namespace: "));
        assert!(errors(|d| d.workloads[0].service_account = "".into())[0].starts_with("workloads[0].serviceAccount: "));
    }

    #[test]
    fn app_protocol_rules() {
        assert_error(
            |d| d.service_mut(0).ports[0].app_protocol = Some("quic".into()),
            r#"services[0].ports[0].appProtocol: "quic" is not an application protocol: use "tcp", "http", "http2", "grpc" or "auto""#,
        );
        assert_error(
            |d| {
                d.service_mut(0).mode = "kernel".into();
                d.service_mut(0).ports[1].app_protocol = Some("grpc".into());
            },
            r#"services[0].ports[1].appProtocol: "grpc" needs services[0].mode: proxy, not kernel: the kernel balances connections and cannot see requests"#,
        );
        let mut d = good();
        d.service_mut(0).mode = "kernel".into();
        d.service_mut(0).ports[0].app_protocol = Some("tcp".into());
        assert!(State::from_document(&d).is_ok(), "kernel mode with tcp is fine");
        d.service_mut(0).mode = "proxy".into();
        for (name, want) in [
            ("http", AppProtocol::Http),
            ("http2", AppProtocol::Http2),
            ("grpc", AppProtocol::Grpc),
            ("auto", AppProtocol::Auto),
        ] {
            d.service_mut(0).ports[0].app_protocol = Some(name.into());
            assert_eq!(State::from_document(&d).unwrap().services[0].ports[0].app_protocol, want);
        }
        assert_eq!(
            State::from_document(&good()).unwrap().services[0].ports[0].app_protocol,
            AppProtocol::Tcp,
            "default"
        );
    }

    #[test]
    fn service_rules() {
        assert_error(
            |d| d.service_mut(0).vip = "10.96.0".into(),
            r#"services[0].vip: "10.96.0" is not an IPv4 address"#,
        );
        assert_error(
            |d| d.service_mut(0).mode = "fast".into(),
            r#"services[0].mode: "fast" is not a mode: use "proxy" or "kernel""#,
        );
        assert_error(|d| d.service_mut(0).ports.clear(), "services[0].ports: a service needs at least one port");
        assert_error(
            |d| d.service_mut(0).ports[0].port = 70000,
            "services[0].ports[0].port: 70000 is not a port: use 1 to 65535",
        );
        assert_error(
            |d| d.service_mut(0).ports[0].target_port = Some(0),
            "services[0].ports[0].targetPort: 0 is not a port: use 1 to 65535",
        );
        assert_error(|d| d.service_mut(0).ports[1].port = 80, "services[0].ports[1].port: port 80 is listed twice");
        assert_error(
            |d| d.service_mut(0).ports[0].protocol = "UDP".into(),
            r#"services[0].ports[0].protocol: "UDP" is not supported: use "TCP""#,
        );
        assert!(errors(|d| d.service_mut(0).name = "Web".into())[0].starts_with("services[0].name: "));
        assert!(errors(|d| d.service_mut(0).namespace = "".into())[0].starts_with("services[0].namespace: "));
        let dup = |d: &mut Document| {
            let mut s = d.service_mut(0).clone();
            s.vip = "10.96.0.11".into();
            d.services.push(Arc::new(s));
        };
        assert_error(dup, "services[1].name: service default/web is already services[0]");
        let same_address = |d: &mut Document| {
            let mut s = d.service_mut(0).clone();
            s.name = "web2".into();
            d.services.push(Arc::new(s));
        };
        assert_error(same_address, "services[1].ports[0].port: 10.96.0.10:80 is already served by services[0]");
    }

    #[test]
    fn endpoint_rules() {
        assert_error(
            |d| d.service_mut(0).endpoints[0].ip = "10.0.0.300".into(),
            r#"services[0].endpoints[0].ip: "10.0.0.300" is not an IPv4 address"#,
        );
        assert_error(
            |d| d.service_mut(0).endpoints[1].ip = "10.244.1.3".into(),
            "services[0].endpoints[1].ip: endpoint 10.244.1.3 is listed twice",
        );
        assert_error(
            |d| d.service_mut(0).endpoints[0].node = "nowhere".into(),
            r#"services[0].endpoints[0].node: node "nowhere" is not in `nodes`; add it there or fix the name"#,
        );
        assert_error(
            |d| d.service_mut(0).endpoints[0].weight = 70000,
            "services[0].endpoints[0].weight: weight 70000 is above the maximum 65535",
        );
        assert_error(
            |d| d.service_mut(0).endpoints[0].weight = -1,
            "services[0].endpoints[0].weight: weight -1 is negative: use 0 (drain) to 65535",
        );
    }

    #[test]
    fn failover_and_health_rules() {
        assert_error(
            |d| d.service_mut(0).endpoints[0].priority = 300,
            "services[0].endpoints[0].priority: priority 300 is not in 0..255 (0 is the most preferred)",
        );
        let hc = |f: fn(&mut HealthCheckDoc)| {
            move |d: &mut Document| {
                let mut h = HealthCheckDoc {
                    protocol: "http".into(),
                    path: Some("/healthz".into()),
                    interval: None,
                    timeout: None,
                    rise: None,
                    fall: None,
                };
                f(&mut h);
                d.service_mut(0).health_check = Some(h);
            }
        };
        assert_error(
            hc(|h| h.protocol = "udp".into()),
            r#"services[0].healthCheck.protocol: "udp" is not a check: use "tcp", "http" or "none""#,
        );
        assert_error(
            hc(|h| h.path = Some("healthz".into())),
            r#"services[0].healthCheck.path: "healthz" must start with '/'"#,
        );
        assert_error(
            hc(|h| h.protocol = "tcp".into()),
            "services[0].healthCheck.path: a tcp check has no path; use protocol: http",
        );
        assert_error(
            hc(|h| h.interval = Some("5".into())),
            r#"services[0].healthCheck.interval: "5" is not a duration: write e.g. 500ms, 5s or 1m"#,
        );
        assert_error(
            hc(|h| h.interval = Some("10ms".into())),
            "services[0].healthCheck.interval: 10ms is not between 100ms and 3600s",
        );
        assert_error(
            hc(|h| h.timeout = Some("6s".into())),
            "services[0].healthCheck.timeout: 6s is longer than the interval 5s",
        );
        assert_error(hc(|h| h.rise = Some(0)), "services[0].healthCheck.rise: 0 is not in 1..100");
        assert_error(hc(|h| h.fall = Some(101)), "services[0].healthCheck.fall: 101 is not in 1..100");
        assert_error(|d| d.service_mut(0).retries = Some(11), "services[0].retries: 11 retries are not in 0..10");
        assert_error(
            |d| d.service_mut(0).connect_timeout = Some("5ms".into()),
            "services[0].connectTimeout: 5ms is not between 10ms and 60s",
        );
        assert_error(
            |d| d.service_mut(0).retry_budget = Some("x".into()),
            r#"services[0].retryBudget: "x" is not a duration: write e.g. 500ms, 5s or 1m"#,
        );
        let s = State::from_document(&good()).unwrap();
        let web = &s.services[0];
        assert_eq!(
            web.health_check,
            Some(HealthCheck {
                kind: CheckKind::Tcp,
                interval: Duration::from_secs(5),
                timeout: Duration::from_secs(1),
                rise: 2,
                fall: 3
            }),
            "tcp check with the documented defaults"
        );
        assert!(web.fail_open);
        assert_eq!((web.retries, web.connect_timeout), (3, Duration::from_secs(1)));
        let mut d = good();
        d.service_mut(0).health_check = Some(HealthCheckDoc {
            protocol: "none".into(),
            path: None,
            interval: None,
            timeout: None,
            rise: None,
            fall: None,
        });
        assert_eq!(State::from_document(&d).unwrap().services[0].health_check, None);
    }

    #[test]
    fn mtls_and_authorization_rules() {
        assert_error(
            |d| d.service_mut(0).mtls = Some("maybe".into()),
            r#"services[0].mtls: "maybe" is not an mTLS mode: use "required" or "disabled""#,
        );
        let auth = |ids: &[&str], ns: &[&str]| {
            let a = AuthorizationDoc {
                identities: ids.iter().map(|s| s.to_string()).collect(),
                namespaces: ns.iter().map(|s| s.to_string()).collect(),
            };
            move |d: &mut Document| d.service_mut(0).authorization = Some(a)
        };
        assert_error(
            auth(&["spiffe://cluster.local/ns/a/sa/b", "web"], &[]),
            r#"services[0].authorization.identities[1]: "web" is not a SPIFFE ID: it must start with spiffe://"#,
        );
        assert!(errors(auth(&[], &["Bad_NS"]))[0].starts_with("services[0].authorization.namespaces[0]: "));
        let s = State::from_document(&good()).unwrap();
        assert!(s.services[0].mtls, "mTLS is required by default");
        assert_eq!(s.services[0].authorization, None);
    }

    #[test]
    fn policy_decisions() {
        let id = |s: &str| Identity::parse(s).unwrap();
        let td = "cluster.local";
        let (web, other_ns, foreign) = (
            id("spiffe://cluster.local/ns/default/sa/web"),
            id("spiffe://cluster.local/ns/shop/sa/cart"),
            id("spiffe://evil.example/ns/default/sa/web"),
        );
        assert!(Authorization::allows(None, td, &web), "default: same trust domain");
        assert!(!Authorization::allows(None, td, &foreign), "default: other trust domains are denied");
        let by_id = Authorization { identities: vec![web.clone()], namespaces: vec![] };
        assert!(Authorization::allows(Some(&by_id), td, &web));
        assert!(!Authorization::allows(Some(&by_id), td, &other_ns));
        let by_ns = Authorization { identities: vec![], namespaces: vec![Name::parse("shop").unwrap()] };
        assert!(Authorization::allows(Some(&by_ns), td, &other_ns));
        assert!(!Authorization::allows(Some(&by_ns), td, &web));
        let foreign_shop = id("spiffe://evil.example/ns/shop/sa/cart");
        assert!(!Authorization::allows(Some(&by_ns), td, &foreign_shop), "namespaces only count in our trust domain");
        let empty = Authorization { identities: vec![], namespaces: vec![] };
        assert!(!Authorization::allows(Some(&empty), td, &web), "an empty allow list denies all");
    }

    #[test]
    fn a_vip_may_not_shadow_a_node_a_workload_or_an_endpoint() {
        assert_error(
            |d| d.service_mut(0).vip = "172.18.0.3".into(),
            "services[0].vip: 172.18.0.3 is the address of node node-b (nodes[1]): a VIP must be an address no node or pod has, or connections to it would be captured; choose another VIP",
        );
        assert_error(
            |d| d.service_mut(0).vip = "10.244.2.2".into(),
            "services[0].vip: 10.244.2.2 is the address of workload default/other (workloads[1]): a VIP must be an address no node or pod has, or connections to it would be captured; choose another VIP",
        );
        // Another service's endpoint: the rule looks across services.
        let shadow = |d: &mut Document| {
            let mut s = d.service_mut(0).clone();
            s.name = "api".into();
            s.vip = "10.96.0.20".into();
            s.endpoints.truncate(1);
            s.endpoints[0].ip = "10.244.9.9".into();
            d.services.push(Arc::new(s));
            d.service_mut(0).vip = "10.244.9.9".into();
        };
        assert_error(
            shadow,
            "services[0].vip: 10.244.9.9 is the address of an endpoint of api (services[1].endpoints[0]): a VIP must be an address no node or pod has, or connections to it would be captured; choose another VIP",
        );
    }

    #[test]
    fn more_workloads_than_one_node_holds_are_left_to_the_capacity_check() {
        // Cluster-wide counts are not limits: each node holds only its own
        // workloads in its map (see capacity.rs).
        let mut d = good();
        let w = d.workloads[1].clone();
        d.workloads = (0..5000u32)
            .map(|i| WorkloadDoc { ip: Ipv4Addr::from(0x0a01_0000 + i).to_string(), ..w.clone() })
            .collect();
        assert!(State::from_document(&d).is_ok());
    }

    #[test]
    fn every_bad_field_is_reported_at_once() {
        let e = errors(|d| {
            d.nodes[0].address = "bad".into();
            d.service_mut(0).endpoints[0].weight = 70000;
            d.service_mut(0).vip = "nope".into();
        });
        assert_eq!(e.len(), 3, "{e:#?}");
    }

    /// A write validated by what it changes decides as a validation of the
    /// whole document does: the same state, the same errors, and an index
    /// that is the new state's.
    #[test]
    fn a_change_checked_against_the_index_decides_as_a_whole_validation() {
        let base = || {
            let mut d = good();
            let mut api = (*d.services[0]).clone();
            api.name = "api".into();
            api.vip = "10.96.0.30".into();
            api.endpoints.truncate(1);
            api.endpoints[0].ip = "10.244.3.3".into();
            d.services.push(Arc::new(api));
            d
        };
        let prev_doc = base();
        let prev = State::from_document(&prev_doc).unwrap();
        let index = Index::of(&prev, 256);
        fn ep(ip: &str) -> EndpointDoc {
            EndpointDoc { ip: ip.into(), node: "node-a".into(), weight: 1, priority: 0 }
        }
        type Edit = Box<dyn Fn(&mut Document)>;
        let edits: Vec<(&str, Edit)> = vec![
            ("a weight", Box::new(|d| d.service_mut(0).endpoints[0].weight = 9)),
            ("nothing", Box::new(|_| {})),
            ("a removal", Box::new(|d| drop(d.services.remove(0)))),
            (
                "a new service",
                Box::new(|d| {
                    let mut s = (*d.services[1]).clone();
                    s.name = "new".into();
                    s.vip = "10.96.0.40".into();
                    d.services.push(Arc::new(s));
                }),
            ),
            (
                "a service moved to a freed VIP",
                Box::new(|d| {
                    let mut s = (*d.services.remove(1)).clone();
                    s.name = "moved".into();
                    d.services.insert(0, Arc::new(s));
                }),
            ),
            (
                "a duplicate name",
                Box::new(|d| {
                    let mut s = (*d.services[1]).clone();
                    s.vip = "10.96.0.41".into();
                    d.services.push(Arc::new(s));
                }),
            ),
            (
                "a duplicate address",
                Box::new(|d| {
                    let mut s = (*d.services[0]).clone();
                    s.name = "copy".into();
                    d.services.push(Arc::new(s));
                }),
            ),
            ("a VIP at another service's endpoint", Box::new(|d| d.service_mut(1).vip = "10.244.1.3".into())),
            ("an endpoint at an unchanged VIP", Box::new(|d| d.service_mut(1).endpoints.push(ep("10.96.0.10")))),
            ("an endpoint at its own VIP", Box::new(|d| d.service_mut(1).endpoints.push(ep("10.96.0.30")))),
            ("a bad field", Box::new(|d| d.service_mut(1).endpoints[0].ip = "10.0.0.300".into())),
            (
                "an unknown node",
                Box::new(|d| d.service_mut(1).endpoints.push(EndpointDoc { node: "x".into(), ..ep("10.244.7.7") })),
            ),
            ("services reversed", Box::new(|d| d.services.reverse())),
            ("a node removed (a whole validation)", Box::new(|d| drop(d.nodes.pop()))),
        ];
        for (what, edit) in edits {
            let mut doc = prev_doc.clone();
            edit(&mut doc);
            let whole = validate(None, &doc, 256);
            let by_change = validate(Some((&prev_doc, &prev, &index)), &doc, 256);
            match (whole, by_change) {
                (Ok(w), Ok(c)) => {
                    assert_eq!(w.state, c.state, "{what}");
                    assert_eq!(c.changes.whole, what.contains("whole"), "{what}");
                    let mut after = index.clone();
                    if c.changes.whole {
                        after = Index::of(&c.state, 256);
                    } else {
                        after.apply(&c.index_change);
                    }
                    assert_eq!(after, Index::of(&w.state, 256), "{what}");
                }
                (Err(w), Err(c)) => {
                    let (mut w, mut c) = (w.0, c.0);
                    w.sort_by(|a, b| a.path.cmp(&b.path));
                    c.sort_by(|a, b| a.path.cmp(&b.path));
                    assert_eq!(w, c, "{what}");
                }
                (w, c) => panic!("{what}: whole {:?}, by change {:?}", w.err(), c.err()),
            }
        }
    }

    /// With lists of several chunks, kept chunks are passed over whole
    /// and the new state shares them with the state before.
    #[test]
    fn a_change_in_one_chunk_shares_the_others() {
        let mut text = String::from("nodes: [{name: a, address: 172.18.0.2}]\nservices:\n");
        for i in 0..200 {
            text += &format!(
                " - {{name: s{i}, vip: 10.96.{}.{}, ports: [{{port: 80}}], endpoints: [{{ip: 10.0.0.1, node: a}}]}}\n",
                i / 200,
                i % 200 + 1
            );
        }
        let prev_doc = parse_document(&text).unwrap();
        let prev = State::from_document(&prev_doc).unwrap();
        let index = Index::of(&prev, 256);
        type Edit = Box<dyn Fn(&mut Document)>;
        let edits: Vec<(&str, Edit)> = vec![
            ("a weight in chunk 2", Box::new(|d| d.service_mut(130).endpoints[0].weight = 4)),
            ("a removal in chunk 1", Box::new(|d| drop(d.services.remove(70)))),
            (
                "an append",
                Box::new(|d| {
                    let mut s = (*d.services[0]).clone();
                    s.name = "new".into();
                    s.vip = "10.96.9.9".into();
                    d.services.push(Arc::new(s));
                }),
            ),
            ("a duplicate name in chunk 3", Box::new(|d| d.service_mut(199).name = "s3".into())),
        ];
        for (what, edit) in edits {
            let mut doc = prev_doc.clone();
            edit(&mut doc);
            let whole = validate(None, &doc, 256);
            let c = validate(Some((&prev_doc, &prev, &index)), &doc, 256);
            match (whole, c) {
                (Ok(w), Ok(c)) => {
                    assert_eq!(w.state, c.state, "{what}");
                    assert!(
                        Arc::ptr_eq(&c.state.services.chunks()[0], &prev.services.chunks()[0]),
                        "{what}: chunk 0 shared"
                    );
                    let touched = c.changes.changed.len() + c.changes.removed.len();
                    assert!(touched <= 2, "{what}: {touched} services checked or removed");
                }
                (Err(w), Err(c)) => assert_eq!(w, c, "{what}"),
                (w, c) => panic!("{what}: whole {:?}, by change {:?}", w.err(), c.err()),
            }
        }
    }
}
