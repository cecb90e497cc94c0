//! Route documents checked against the services and compiled: every bad
//! field reported with its path (`routes[0].spec.rules[1].matches[0]...`)
//! and what would fix it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use hyper::header::{HeaderName, HeaderValue};

use super::doc::{
    FilterDoc, GrpcMethodDoc, HeaderModifierDoc, MatchDoc, MethodDoc, PathModifierDoc, RefDoc, ReferenceGrantDoc,
    RouteDoc, ValueMatchDoc,
};
use super::{
    permits, Backend, Entry, Filters, HeaderModifier, Match, Mirror, PathMatch, PathModifier, Redirect, RefReason,
    Rewrite, RouteKey, Router, Routes, Rule, Unresolved, ValueMatch,
};
use crate::model::errors::{invalid, Errors, Invalid};
use crate::model::{parse_duration, Name, PortKey, Service, ServiceKey};

mod filters;
mod matches;
use filters::filters;
use matches::compiled_match;

const GROUP: &str = "gateway.networking.k8s.io";
const API_VERSION: &str = "gateway.networking.k8s.io/v1";
/// ReferenceGrant is served as v1beta1 (and as v1 by newer releases).
const GRANT_VERSIONS: [&str; 2] = ["gateway.networking.k8s.io/v1beta1", "gateway.networking.k8s.io/v1"];

/// Largest regular expression, compiled (bytes): a route cannot make the
/// proxy hold megabytes per pattern.
const REGEX_SIZE: usize = 1 << 20;

/// `docs` compiled against the services `find` knows (by namespace and
/// name). Errors go to `e` under `routes[i]`.
pub(in crate::model) fn compile(
    e: &mut Errors,
    docs: &[Arc<RouteDoc>],
    grants: &[Arc<ReferenceGrantDoc>],
    find: &Find<'_>,
) -> Routes {
    for (i, g) in grants.iter().enumerate() {
        grant(e, &format!("referenceGrants[{i}]"), g);
    }
    let unresolved = RefCell::new(Vec::new());
    // (parent, entry with its sort key) of every route.
    let mut sorted = ByParent::new();
    let mut seen = HashMap::new();
    for (i, d) in docs.iter().enumerate() {
        let p = format!("routes[{i}]");
        if !e.first_named(&mut seen, ("routes", "route"), i, (&d.metadata.namespace, &d.metadata.name)) {
            continue;
        }
        let refs = Refs { route: i, kind: &d.kind, grants, find, unresolved: &unresolved };
        route(e, &p, d, &refs, &mut sorted);
    }
    let by_parent = sorted
        .into_iter()
        .map(|(parent, mut entries)| {
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            let mut rules: Vec<Arc<Rule>> = Vec::new();
            let mut at: HashMap<*const Rule, usize> = HashMap::new();
            let mut consumers: Vec<Name> = Vec::new();
            let entries = entries
                .into_iter()
                .map(|(_, mut entry, rule)| {
                    entry.rule = *at.entry(Arc::as_ptr(&rule)).or_insert_with(|| {
                        rules.push(rule.clone());
                        rules.len() - 1
                    });
                    if entry.namespace != parent.namespace && !consumers.contains(&entry.namespace) {
                        consumers.push(entry.namespace.clone());
                    }
                    entry
                })
                .collect();
            let entries: Vec<Entry> = entries;
            let (by_segment, generic) = segment_index(&entries);
            let router = Router { parent: parent.clone(), entries, rules, consumers, by_segment, generic };
            (parent, Arc::new(router))
        })
        .collect();
    Routes { docs: docs.to_vec(), grants: grants.to_vec(), unresolved: unresolved.into_inner(), by_parent }
}

/// What the backendRefs of one route resolve against, and where those
/// that do not are noted.
struct Refs<'a> {
    /// The route's index in the document.
    route: usize,
    /// `HTTPRoute` or `GRPCRoute`, for the grants.
    kind: &'a str,
    grants: &'a [Arc<ReferenceGrantDoc>],
    find: &'a Find<'a>,
    unresolved: &'a RefCell<Vec<Unresolved>>,
}

impl Refs<'_> {
    fn note(&self, path: &str, reason: RefReason, message: String) {
        self.unresolved.borrow_mut().push(Unresolved { route: self.route, path: path.to_owned(), reason, message });
    }
}

/// A ReferenceGrant, checked: only what it says about routes and Services
/// counts, and a grant that says something else is refused, not ignored.
fn grant(e: &mut Errors, p: &str, g: &ReferenceGrantDoc) {
    if !GRANT_VERSIONS.contains(&g.api_version.as_str()) {
        e.push(
            format!("{p}.apiVersion"),
            format!("{:?} is not served here: write {:?}", g.api_version, GRANT_VERSIONS[0]),
        );
    }
    if g.kind != "ReferenceGrant" {
        e.push(format!("{p}.kind"), format!("{:?}: write \"ReferenceGrant\"", g.kind));
    }
    e.take(|| format!("{p}.metadata.namespace"), Name::parse(&g.metadata.namespace));
    e.take(|| format!("{p}.metadata.name"), Name::parse(&g.metadata.name));
    if g.spec.from.is_empty() || g.spec.to.is_empty() {
        e.push(format!("{p}.spec"), "needs at least one `from` and one `to`");
    }
    for (i, f) in g.spec.from.iter().enumerate() {
        if f.group != GROUP || !["HTTPRoute", "GRPCRoute"].contains(&f.kind.as_str()) {
            e.push(
                format!("{p}.spec.from[{i}]"),
                format!(
                    "{}/{} refers to nothing on the mesh: grant group {GROUP:?}, kind HTTPRoute or GRPCRoute",
                    f.group, f.kind
                ),
            );
        }
        e.take(|| format!("{p}.spec.from[{i}].namespace"), Name::parse(&f.namespace));
    }
    for (i, t) in g.spec.to.iter().enumerate() {
        if !t.group.is_empty() || t.kind != "Service" {
            e.push(
                format!("{p}.spec.to[{i}]"),
                format!("{}/{} is not a Service: grant group \"\", kind Service", t.group, t.kind),
            );
        }
    }
}

/// Finds a Service by namespace and name.
pub type Find<'a> = dyn Fn(&str, &str) -> Option<ServiceShape> + 'a;

/// What routing needs of a Service: its key, whether the kernel balances
/// it (no request is seen), and its ports with whether each carries
/// requests. The state's services give it, and so do a cluster's, for
/// the status of its routes.
#[derive(Debug, Clone)]
pub struct ServiceShape {
    pub key: ServiceKey,
    pub kernel: bool,
    pub ports: Vec<(u16, bool)>,
}

impl ServiceShape {
    pub fn of(s: &Service) -> Self {
        let ports = s.ports.iter().map(|p| (p.port.0, p.app_protocol.is_requests())).collect();
        ServiceShape { key: s.key(), kernel: s.mode == crate::model::Mode::Kernel, ports }
    }
}

/// One route checked alone against the services `find` knows and
/// `grants`: its errors (what makes it refused) and its refs that do not
/// resolve. The status a cluster's route gets is decided by this, the
/// same code that compiles the state's.
pub fn check(
    doc: &Arc<RouteDoc>,
    grants: &[Arc<ReferenceGrantDoc>],
    find: &Find<'_>,
) -> (crate::model::ValidationErrors, Vec<Unresolved>) {
    let mut e = Errors::default();
    let routes = compile(&mut e, std::slice::from_ref(doc), grants, find);
    (crate::model::ValidationErrors(e.0), routes.unresolved)
}

/// Entries in all of the segment lists at most (a router whose index
/// would be larger checks every entry instead).
const INDEX_SIZE: usize = 1 << 20;

/// The first segment of a path: `api` of `/api/v1`, `` of `/`.
pub fn first_segment(path: &str) -> &str {
    // Bytes, not chars: `/` is ASCII, so any index found is a boundary.
    let rest = &path[path.bytes().position(|b| b != b'/').unwrap_or(path.len())..];
    &rest[..rest.bytes().position(|b| b == b'/').unwrap_or(rest.len())]
}

/// The entries by the first path segment they can match (an Exact path's,
/// a PathPrefix's other than `/`), each list with the entries that may
/// match any path (a prefix `/`, a regular expression) merged in, in
/// precedence order; and those alone, for a segment no entry names.
fn segment_index(entries: &[Entry]) -> (Option<super::SegmentIndex>, Vec<usize>) {
    let segment = |e: &Entry| match &e.matches.path {
        PathMatch::Exact(p) => Some(first_segment(p).to_owned()),
        PathMatch::Prefix(p) if p != "/" => Some(first_segment(p).to_owned()),
        _ => None,
    };
    let mut by = super::SegmentIndex::default();
    let mut generic = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        match segment(e) {
            Some(s) => by.entry(s).or_default().push(i),
            None => generic.push(i),
        }
    }
    if by.len().saturating_mul(generic.len()).saturating_add(entries.len()) > INDEX_SIZE {
        return (None, (0..entries.len()).collect());
    }
    for list in by.values_mut() {
        list.extend(&generic);
        list.sort_unstable();
    }
    (Some(by), generic)
}

/// Resolves a Service reference to its port, or says why not.
type Resolve<'a> = dyn Fn(&mut Errors, &str, &RefDoc) -> Option<PortKey> + 'a;

/// The entries of each parent, with their precedence, before sorting.
type ByParent = HashMap<ServiceKey, Vec<(SortKey, Entry, Arc<Rule>)>>;

/// The Gateway API's precedence among matches of the routes of one
/// parent: an Exact path, then a regular expression (whose place the spec
/// leaves to the implementation; before prefixes, as Istio has it, so a
/// catch-all `/` does not hide it), then the longest PathPrefix, then a
/// method, then the most header matches, then the most query parameter
/// matches; then the route listed first (the oldest, in a cluster), its
/// `namespace/name`, its rule order and its match order.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct SortKey {
    path_kind: u8,
    prefix_len: std::cmp::Reverse<usize>,
    no_method: bool,
    headers: std::cmp::Reverse<usize>,
    query: std::cmp::Reverse<usize>,
    route: usize,
    key: RouteKey,
    rule: usize,
    matched: usize,
}

fn route(e: &mut Errors, p: &str, d: &RouteDoc, refs: &Refs<'_>, sorted: &mut ByParent) {
    let find = refs.find;
    if d.api_version != API_VERSION {
        e.push(format!("{p}.apiVersion"), format!("{:?} is not served here: write {API_VERSION:?}", d.api_version));
    }
    let grpc = match d.kind.as_str() {
        "HTTPRoute" => false,
        "GRPCRoute" => true,
        k => {
            e.push(format!("{p}.kind"), format!("{k:?} is not a route kind: write \"HTTPRoute\" or \"GRPCRoute\""));
            false
        }
    };
    let namespace = e.take(|| format!("{p}.metadata.namespace"), Name::parse(&d.metadata.namespace));
    let name = e.take(|| format!("{p}.metadata.name"), Name::parse(&d.metadata.name));
    let (Some(namespace), Some(name)) = (namespace, name) else { return };
    let key = RouteKey { namespace: namespace.clone(), name };
    // A parent of another kind (a Gateway) is another controller's: the
    // mesh takes the Service parents, and needs one.
    if !d.spec.parent_refs.iter().any(RefDoc::is_service) {
        e.push(format!("{p}.spec.parentRefs"), "names no Service: add the Service whose traffic it routes");
    }
    let mut parents = Vec::new();
    for (j, r) in d.spec.parent_refs.iter().enumerate().filter(|(_, r)| r.is_service()) {
        let rp = format!("{p}.spec.parentRefs[{j}]");
        if let Some(parent) = parent(e, &rp, r, &namespace, find) {
            parents.push(parent);
        }
    }
    let mut rules = Vec::new();
    for (j, r) in d.spec.rules.iter().enumerate() {
        let rp = format!("{p}.spec.rules[{j}]");
        let resolve = |e: &mut Errors, p: &str, r: &RefDoc| {
            backend(e, p, r, (&namespace, &parents), refs).and_then(|b| b.ok()).map(|b| b.port)
        };
        let filters = filters(e, &format!("{rp}.filters"), &r.filters, (true, grpc), &resolve);
        let (mut backends, mut unresolved_weight) = (Vec::new(), 0u64);
        for (k, b) in r.backend_refs.iter().enumerate() {
            match backend(e, &format!("{rp}.backendRefs[{k}]"), b, (&namespace, &parents), refs) {
                Some(Ok(b)) => backends.push(b),
                Some(Err(weight)) => unresolved_weight += u64::from(weight),
                None => {}
            }
        }
        if r.backend_refs.is_empty() && filters.redirect.is_none() {
            e.push(
                format!("{rp}.backendRefs"),
                "is empty and the rule has no RequestRedirect: name a Service to send its requests to",
            );
        }
        if filters.redirect.is_some() && !r.backend_refs.is_empty() {
            e.push(
                format!("{rp}.filters"),
                "RequestRedirect answers the request itself: remove the rule's backendRefs, or the redirect",
            );
        }
        let timeouts = r.timeouts.clone().unwrap_or_default();
        let timeout =
            timeouts.request.as_deref().and_then(|t| e.take(|| format!("{rp}.timeouts.request"), parse_duration(t)));
        let backend_timeout = timeouts
            .backend_request
            .as_deref()
            .and_then(|t| e.take(|| format!("{rp}.timeouts.backendRequest"), parse_duration(t)));
        if let (Some(t), Some(b)) = (timeout, backend_timeout) {
            if b > t {
                e.push(
                    format!("{rp}.timeouts.backendRequest"),
                    format!("{b:?} is longer than request {t:?}: make it shorter"),
                );
            }
        }
        let retry = r.retry.as_ref().and_then(|d| retry(e, &format!("{rp}.retry"), d, grpc));
        let name = match &r.name {
            Some(n) => e.take(|| format!("{rp}.name"), Name::parse(n)).map_or_else(|| j.to_string(), |n| n.to_string()),
            None => j.to_string(),
        };
        let name: Arc<str> = name.into();
        let rule = Arc::new(Rule {
            route: key.clone(),
            label: key.to_string().into(),
            name,
            filters,
            total_weight: backends.iter().map(|b| u64::from(b.weight)).sum::<u64>() + unresolved_weight,
            backends,
            timeout,
            backend_timeout,
            retry,
        });
        let matches: Vec<MatchDoc> = if r.matches.is_empty() { vec![MatchDoc::default()] } else { r.matches.clone() };
        for (k, m) in matches.iter().enumerate() {
            let Some((m, sort)) = compiled_match(e, &format!("{rp}.matches[{k}]"), m, grpc) else { continue };
            rules.push((m, sort, j, k, rule.clone()));
        }
    }
    for (service, port) in &parents {
        for (m, (path_kind, prefix_len, no_method, headers, query), j, k, rule) in &rules {
            let sort = SortKey {
                path_kind: *path_kind,
                prefix_len: std::cmp::Reverse(*prefix_len),
                no_method: *no_method,
                headers: std::cmp::Reverse(*headers),
                query: std::cmp::Reverse(*query),
                route: refs.route,
                key: key.clone(),
                rule: *j,
                matched: *k,
            };
            let entry = Entry { port: *port, namespace: namespace.clone(), matches: m.clone(), rule: 0, at: (*j, *k) };
            sorted.entry(service.clone()).or_default().push((sort, entry, rule.clone()));
        }
    }
}

/// A Service reference's namespace and name, and its port, checked.
fn service_ref(
    e: &mut Errors,
    p: &str,
    r: &RefDoc,
    namespace: &Name,
    find: &Find<'_>,
) -> Option<(ServiceShape, Option<u16>)> {
    if r.group.as_deref().is_some_and(|g| !g.is_empty()) || r.kind.as_deref().is_some_and(|k| k != "Service") {
        e.push(format!("{p}.kind"), "only a Service (group \"\", kind Service) may be named on the mesh");
        return None;
    }
    let ns = r.namespace.as_deref().unwrap_or(namespace.as_str());
    let Some(s) = find(ns, &r.name) else {
        e.push(
            format!("{p}.name"),
            format!("there is no service {ns}/{}: add it to services, or name one that exists", r.name),
        );
        return None;
    };
    let port = match r.port {
        None => None,
        Some(n) => {
            let Some(n) = u16::try_from(n).ok().filter(|n| s.ports.iter().any(|(p, _)| p == n)) else {
                e.push(format!("{p}.port"), format!("service {ns}/{} has no port {n}: name one of its ports", r.name));
                return None;
            };
            Some(n)
        }
    };
    Some((s, port))
}

fn parent(e: &mut Errors, p: &str, r: &RefDoc, namespace: &Name, find: &Find<'_>) -> Option<(ServiceKey, Option<u16>)> {
    if r.section_name.is_some() {
        e.push(format!("{p}.sectionName"), "is for Gateways: attach to a Service port with `port`");
    }
    if r.weight.is_some() || !r.filters.is_empty() {
        e.push(p.to_owned(), "a parentRef has no weight or filters: those belong to backendRefs");
    }
    let (s, port) = service_ref(e, p, r, namespace, find)?;
    if s.kernel {
        e.push(p.to_owned(), format!("service {} is in kernel mode: the kernel balances its connections and sees no request; set mode: proxy to route its requests", s.key));
        return None;
    }
    match port {
        Some(n) if !s.ports.iter().any(|(p, requests)| *p == n && *requests) => {
            e.push(format!("{p}.port"), format!("port {n} of service {} carries tcp: give it appProtocol http, http2, grpc or auto to route its requests", s.key));
            return None;
        }
        None if !s.ports.iter().any(|(_, requests)| *requests) => {
            e.push(
                p.to_owned(),
                format!(
                    "no port of service {} carries requests: give one appProtocol http, http2, grpc or auto",
                    s.key
                ),
            );
            return None;
        }
        _ => {}
    }
    Some((s.key, port))
}

/// A backendRef: a Service of the route's namespace, or of a parent's (a
/// consumer route may send to its parent's namespace, as GAMMA allows),
/// or of a namespace whose ReferenceGrant lets the route's name it. None:
/// the ref is written wrong (an error in `e`); `Err(weight)`: it is
/// written right but names nothing the route may use (noted in `refs`),
/// and its share of the rule's requests is answered 500, as the Gateway
/// API says.
fn backend(
    e: &mut Errors,
    p: &str,
    r: &RefDoc,
    (namespace, parents): (&Name, &[(ServiceKey, Option<u16>)]),
    refs: &Refs<'_>,
) -> Option<Result<Backend, u32>> {
    if r.section_name.is_some() {
        e.push(format!("{p}.sectionName"), "is for Gateways: a backendRef names a Service and its port");
    }
    let resolve = |e: &mut Errors, p: &str, r: &RefDoc| {
        backend(e, p, r, (namespace, parents), refs).and_then(|b| b.ok()).map(|b| b.port)
    };
    let filters = filters(e, &format!("{p}.filters"), &r.filters, (false, false), &resolve);
    let weight = r.weight.unwrap_or(1);
    if weight > 1_000_000 {
        e.push(format!("{p}.weight"), format!("{weight} is over 1000000: use a smaller weight"));
        return None;
    }
    let service = r.is_service();
    let Some(port) = r.port.filter(|_| service) else {
        if service {
            e.push(format!("{p}.port"), format!("is missing: name a port of service {}", r.name));
            return None;
        }
        let what = format!("{}/{}", r.group.as_deref().unwrap_or(""), r.kind.as_deref().unwrap_or("Service"));
        refs.note(
            p,
            RefReason::InvalidKind,
            format!("{what} {} is not a Service: only Services are backends on the mesh", r.name),
        );
        return Some(Err(weight));
    };
    let ns = r.namespace.as_deref().unwrap_or(namespace.as_str());
    let near = ns == namespace.as_str() || parents.iter().any(|(k, _)| k.namespace.as_str() == ns);
    if !near && !permits(refs.grants, (refs.kind, namespace.as_str()), (ns, &r.name)) {
        refs.note(
            p,
            RefReason::RefNotPermitted,
            format!("service {ns}/{} is in another namespace and no ReferenceGrant there lets {}s of {namespace} name it: add one", r.name, refs.kind),
        );
        return Some(Err(weight));
    }
    let Some(s) = (refs.find)(ns, &r.name) else {
        refs.note(p, RefReason::BackendNotFound, format!("there is no service {ns}/{}", r.name));
        return Some(Err(weight));
    };
    let Some(port) = u16::try_from(port).ok().filter(|n| s.ports.iter().any(|(p, _)| p == n)) else {
        refs.note(p, RefReason::BackendNotFound, format!("service {ns}/{} has no port {port}", r.name));
        return Some(Err(weight));
    };
    let port = PortKey { service: s.key, port };
    Some(Ok(Backend { label: port.to_string().into(), port, weight, filters }))
}

fn header_name(e: &mut Errors, p: &str, n: &str) -> Option<HeaderName> {
    e.take(|| p.to_owned(), HeaderName::from_bytes(n.as_bytes()).map_err(|_| invalid!("{n:?} is not a header name")))
}

/// An HTTPRoute rule's `retry` as a retry policy: the listed statuses,
/// `attempts` more tries (1 when absent, at most 10), `backoff` as the
/// least wait; the defaults of a service's `http.retries` for the rest.
fn retry(e: &mut Errors, p: &str, d: &super::doc::RetryDoc, grpc: bool) -> Option<crate::model::http::RetryPolicy> {
    use crate::model::http::{Budget, RetryOn, RetryPolicy};
    if grpc {
        e.push(p.to_owned(), "retry is for HTTPRoute; retry gRPC calls with the backend service's http.retries");
        return None;
    }
    let before = e.0.len();
    for (i, c) in d.codes.iter().enumerate() {
        if !(400..=599).contains(c) {
            e.push(format!("{p}.codes[{i}]"), format!("{c} is not a 4xx or 5xx status"));
        }
    }
    if d.codes.is_empty() {
        e.push(format!("{p}.codes"), "is empty: list the statuses to retry, e.g. [503]");
    }
    let attempts = d.attempts.unwrap_or(1);
    if attempts > 10 {
        e.push(format!("{p}.attempts"), format!("{attempts} is over 10: use fewer"));
    }
    let backoff = d.backoff.as_deref().and_then(|b| e.take(|| format!("{p}.backoff"), parse_duration(b)));
    if e.0.len() != before {
        return None;
    }
    Some(RetryPolicy {
        on: RetryOn { statuses: d.codes.iter().map(|c| (*c, *c)).collect(), grpc: 0 },
        attempts,
        budget: Budget::default(),
        max_body: 64 << 10,
        methods: None,
        backoff,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_first_segment_of_a_path() {
        for (path, seg) in [
            ("/api/v1", "api"),
            ("/api", "api"),
            ("//api//v1", "api"),
            ("/", ""),
            ("", ""),
            ("///", ""),
            ("api/v1", "api"),
            ("/ä/ö", "ä"),
            ("/é", "é"),
        ] {
            assert_eq!(super::first_segment(path), seg, "{path:?}");
        }
    }
}
