//! Document -> State, collecting every error with the path of its field.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use super::chunked::CHUNK;
use super::errors::{invalid, Errors};

mod fields;
mod index;
use super::*;
use fields::{nodes, service, workloads};
use index::holds;
pub use index::Index;

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

/// The addresses a document gives either as one (`single`, at `{p}.{one}`)
/// or as a list (`list`, at `{p}.{many}[k]`): at least one, at most one
/// per family; both forms together when the one is in the list.
fn addresses(
    e: &mut Errors,
    p: &str,
    (one, single): (&str, &str),
    (many, list): (&str, &[String]),
) -> Option<Addresses> {
    if single.is_empty() && list.is_empty() {
        e.push(format!("{p}.{one}"), format!("give `{one}` (one address) or `{many}` (one per family)"));
        return None;
    }
    let before = e.0.len();
    let mut a = Addresses::default();
    for (k, s) in list.iter().enumerate() {
        let path = || format!("{p}.{many}[{k}]");
        let Some(ip) = e.take(path, parse_ip(s)) else { continue };
        if let Some(first) = a.set(ip) {
            a.set(first);
            let family = Family::of(ip);
            e.push(path(), format!("{ip} is a second {family} address ({first} is one already): list one per family"));
        }
    }
    if !single.is_empty() {
        if let Some(ip) = e.take(|| format!("{p}.{one}"), parse_ip(single)) {
            if list.is_empty() {
                a.set(ip);
            } else if e.0.len() == before && !a.contains(ip) {
                e.push(
                    format!("{p}.{one}"),
                    format!("{ip} is not in `{many}`: give `{many}` alone, or one of them as `{one}`"),
                );
            }
        }
    }
    (e.0.len() == before).then_some(a)
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
    let holders = nodes_and_workloads(&mut e, prev.map(|(_, s, _)| s), doc, &mut state);
    // What the write changes: counted, and which services.
    let mut change = Index::default();
    let mut changes = Changes { whole: prev.is_none(), ..Changes::default() };
    let runs = match prev {
        Some((pd, ps, _)) => kept(pd, ps, doc, &mut change, &mut changes, table_size),
        None => Vec::new(),
    };
    let mut w =
        Walk { e: &mut e, doc, base, change: &mut change, changes: &mut changes, state: &mut state, table_size };
    let checked = w.services(prev.map(|(_, s, _)| s), runs, &holders.node_names);
    shadowed_vips(&mut e, doc, &state, &holders, (base, &change), &checked, prev.is_some());
    routes(&mut e, prev.map(|(_, s, _)| s), doc, &mut state, &mut changes);
    policies(&mut e, prev.map(|(_, s, _)| s), doc, &mut state, &mut changes);
    if e.0.is_empty() {
        Ok(Validated { state, changes, index_change: change })
    } else {
        Err(ValidationErrors(e.0))
    }
}

/// The routes of `doc`, checked against the services of `state` and
/// compiled; those of `prev` when the documents are the same (a write of
/// services alone changes no router). A write that changes them changes
/// the whole: every reader rebuilds.
fn routes(e: &mut Errors, prev: Option<&State>, doc: &Document, state: &mut State, changes: &mut Changes) {
    if doc.routes.is_empty()
        && doc.reference_grants.is_empty()
        && prev.is_none_or(|p| *p.routes == route::Routes::default())
    {
        state.routes = prev.map(|p| p.routes.clone()).unwrap_or_default();
        return;
    }
    let by_key: HashMap<(&str, &str), &Arc<Service>> =
        state.services.iter().map(|s| ((s.namespace.as_str(), s.name.as_str()), s)).collect();
    let find = |ns: &str, name: &str| by_key.get(&(ns, name)).map(|s| route::ServiceShape::of(s));
    let compiled = super::route::compile(e, &doc.routes, &doc.reference_grants, &find);
    match prev {
        Some(p) if *p.routes == compiled => state.routes = p.routes.clone(),
        _ => {
            changes.whole = true;
            state.routes = Arc::new(compiled);
        }
    }
}

/// The policies of `doc`, checked against the services and workloads of
/// `state` and compiled; those of `prev` when nothing they depend on
/// changed (the documents, and no service or workload can newly fall
/// under a policy: kernel-mode services are refused under one).
/// A write that changes them changes the whole: every reader rebuilds.
fn policies(e: &mut Errors, prev: Option<&State>, doc: &Document, state: &mut State, changes: &mut Changes) {
    let none = |p: &State| p.policies.docs.is_empty() && p.policies.from_services.is_empty();
    let any_service_policy = || state.services.iter().any(|s| s.authorization.is_some());
    if doc.policies.is_empty() && prev.is_none_or(none) && !any_service_policy() {
        state.policies = prev.map(|p| p.policies.clone()).unwrap_or_default();
        return;
    }
    let compiled = super::authz::compile(e, &doc.policies, &state.services, &state.workloads);
    match prev {
        Some(p) if *p.policies == compiled => state.policies = p.policies.clone(),
        _ => {
            changes.whole = true;
            state.policies = Arc::new(compiled);
        }
    }
}

/// Who holds an address besides services, for refusing a VIP that
/// shadows it: node names, and the first node and workload of each address.
struct Holders {
    node_names: HashSet<NodeName>,
    node_addrs: HashMap<IpAddr, usize>,
    workload_ips: HashMap<IpAddr, usize>,
}

/// The nodes and workloads: those of `prev` (unchanged by the write), or
/// checked from `doc`.
fn nodes_and_workloads(e: &mut Errors, prev: Option<&State>, doc: &Document, state: &mut State) -> Holders {
    let mut h = Holders { node_names: HashSet::new(), node_addrs: HashMap::new(), workload_ips: HashMap::new() };
    match prev {
        Some(p) => {
            state.nodes = p.nodes.clone();
            state.workloads = p.workloads.clone();
            for (i, n) in p.nodes.iter().enumerate() {
                h.node_names.insert(n.name.clone());
                for a in n.addresses.iter() {
                    h.node_addrs.entry(a).or_insert(i);
                }
            }
            for (i, w) in p.workloads.iter().enumerate() {
                for ip in w.ips.iter() {
                    h.workload_ips.entry(ip).or_insert(i);
                }
            }
        }
        None => {
            nodes(e, doc, state, &mut h.node_names, &mut h.node_addrs);
            workloads(e, doc, state, &h.node_names, &mut h.workload_ips);
        }
    }
    h
}

/// Which services of `doc` are those of the state before (`pd`, `ps`),
/// by pointer: runs of (index in `doc`, index before, length). The ones
/// gone are counted out of `change` and listed in `changes`.
fn kept(
    pd: &Document,
    ps: &State,
    doc: &Document,
    change: &mut Index,
    changes: &mut Changes,
    table_size: u32,
) -> Vec<(usize, usize, usize)> {
    let mut runs: Vec<(usize, usize, usize)> = Vec::new();
    let mut run = |i: usize, j: usize, n: usize| match runs.last_mut() {
        Some(r) if r.0 + r.2 == i && r.1 + r.2 == j => r.2 += n,
        _ => runs.push((i, j, n)),
    };
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
            let map = by_ptr.get_or_insert_with(|| old.iter().enumerate().map(|(j, s)| (Arc::as_ptr(s), j)).collect());
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
    runs
}

/// Checking the services of a write against the index of the state
/// before.
struct Walk<'a> {
    e: &'a mut Errors,
    doc: &'a Document,
    base: &'a Index,
    change: &'a mut Index,
    changes: &'a mut Changes,
    state: &'a mut State,
    table_size: u32,
}

impl Walk<'_> {
    /// Puts the kept `runs` of `prev` in place and checks every other
    /// service; the services checked (index in the state, in the document).
    fn services(
        &mut self,
        prev: Option<&State>,
        runs: Vec<(usize, usize, usize)>,
        node_names: &HashSet<NodeName>,
    ) -> Vec<(usize, usize)> {
        let (doc, base, table_size) = (self.doc, self.base, self.table_size);
        let mut checked = Vec::new();
        let mut runs = runs.into_iter().peekable();
        let mut i = 0;
        while i < doc.services.len() {
            if let (Some(&(_, j, n)), Some(ps)) = (runs.peek().filter(|r| r.0 == i), prev) {
                runs.next();
                // Whole chunks of the state before where they were, shared.
                let mut k = 0;
                while k < n {
                    let (ni, oi) = (i + k, j + k);
                    let chunk = ps.services.chunks().get(oi / CHUNK).filter(|c| {
                        ni.is_multiple_of(CHUNK) && ni == oi && self.state.services.len() == ni && c.len() <= n - k
                    });
                    match chunk {
                        Some(c) => {
                            self.state.services.push_chunk(c);
                            k += c.len();
                        }
                        None => {
                            self.state.services.push(ps.services[oi].clone());
                            k += 1;
                        }
                    }
                }
                i += n;
                continue;
            }
            let s = &doc.services[i];
            let Some(svc) = service(self.e, i, s, node_names) else {
                i += 1;
                continue;
            };
            let p = format!("services[{i}]");
            let key = svc.key();
            if holds(&base.names, &self.change.names, &key) {
                let first = first_service(doc, i, |o| o.namespace == s.namespace && o.name == s.name);
                self.e.push(format!("{p}.name"), format!("service {key} is already services[{first}]"));
            }
            for (jp, port) in svc.ports.iter().enumerate() {
                for vip in svc.vips.iter() {
                    if holds(&base.addresses, &self.change.addresses, &(vip, port.port.0)) {
                        let first = first_service(doc, i, |o| {
                            doc_vips(o).any(|v| v == vip) && o.ports.iter().any(|x| x.port == i64::from(port.port.0))
                        });
                        self.e.push(
                            format!("{p}.ports[{jp}].port"),
                            format!("{} is already served by services[{first}]", SocketAddr::new(vip, port.port.0)),
                        );
                    }
                }
            }
            self.change.count(&svc, 1, table_size);
            self.changes.changed.push(i);
            checked.push((self.state.services.len(), i));
            self.state.services.push(Arc::new(svc));
            i += 1;
        }
        checked
    }
}

/// connect4 rewrites every connect to a VIP: one that is also a pod's or
/// a node's address, or an endpoint's, would capture ordinary traffic to
/// it. `(base, change)`: the index before and what the write changes.
fn shadowed_vips(
    e: &mut Errors,
    doc: &Document,
    state: &State,
    holders: &Holders,
    (base, change): (&Index, &Index),
    checked: &[(usize, usize)],
    incremental: bool,
) {
    let (node_addrs, workload_ips) = (&holders.node_addrs, &holders.workload_ips);
    let shadow = |vip: IpAddr, holder: String| {
        FieldError {
            path: String::new(),
            message: format!("{vip} is the address of {holder}: a VIP must be an address no node or pod has, or connections to it would be captured; choose another VIP"),
        }
    };
    let endpoint_holder = |ip: IpAddr| -> String {
        for (si, s) in doc.services.iter().enumerate() {
            if let Some(ei) = s.endpoints.iter().position(|x| x.ip.parse() == Ok(ip)) {
                return format!("an endpoint of {} (services[{si}].endpoints[{ei}])", s.name);
            }
        }
        "an endpoint".into()
    };
    let mut blamed = HashSet::new();
    for &(k, i) in checked {
        let s = &state.services[k];
        for vip in s.vips.iter() {
            let holder = if let Some(n) = node_addrs.get(&vip) {
                format!("node {} (nodes[{n}])", state.nodes[*n].name)
            } else if let Some(w) = workload_ips.get(&vip) {
                let wl = &state.workloads[*w];
                format!("workload {}/{} (workloads[{w}])", wl.namespace, wl.name)
            } else if holds(&base.endpoint_ips, &change.endpoint_ips, &vip) {
                endpoint_holder(vip)
            } else {
                continue;
            };
            blamed.insert(vip);
            e.0.push(FieldError { path: vip_path(&doc.services[i], i, vip), ..shadow(vip, holder) });
        }
    }
    // An endpoint added at the VIP of a service this write did not check.
    if incremental {
        for &(k, _) in checked {
            for ep in &state.services[k].endpoints {
                if blamed.contains(&ep.ip) || !holds(&base.vips, &change.vips, &ep.ip) {
                    continue;
                }
                if let Some(i) = doc.services.iter().position(|o| doc_vips(o).any(|v| v == ep.ip)) {
                    blamed.insert(ep.ip);
                    e.0.push(FieldError {
                        path: vip_path(&doc.services[i], i, ep.ip),
                        ..shadow(ep.ip, endpoint_holder(ep.ip))
                    });
                }
            }
        }
    }
}

/// The VIPs a service document names (those that parse).
fn doc_vips(s: &ServiceDoc) -> impl Iterator<Item = IpAddr> + '_ {
    std::iter::once(&s.vip).chain(&s.vips).filter_map(|v| v.parse().ok())
}

/// The path of `vip` in `services[i]` (`s`): `vip`, or its place in `vips`.
fn vip_path(s: &ServiceDoc, i: usize, vip: IpAddr) -> String {
    match s.vips.iter().position(|v| v.parse() == Ok(vip)) {
        Some(k) => format!("services[{i}].vips[{k}]"),
        None => format!("services[{i}].vip"),
    }
}

/// The first service of `doc` other than `i` that `is` finds.
fn first_service(doc: &Document, i: usize, is: impl Fn(&ServiceDoc) -> bool) -> usize {
    doc.services.iter().enumerate().position(|(j, o)| j != i && is(o)).unwrap_or(i)
}

#[cfg(test)]
mod tests;
