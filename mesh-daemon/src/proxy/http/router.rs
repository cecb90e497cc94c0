//! The pure decision of a request on a Service with routes (Gateway API
//! GAMMA): which rule of which attached route matches, which backendRef
//! it goes to (by weight), or the answer the proxy makes itself (a
//! redirect, 404, 500). No I/O and no clock: the randomness of the
//! weighted choice comes in as `unit`, so every case is a table row (see
//! the tests, written from the Gateway API's mesh conformance cases).
//!
//! Frontend routing (this) is apart from backend policy: once a backend
//! Service is chosen, its own route (endpoints, retries, timeouts,
//! outlier ejection) takes the request.

use hyper::header::{self, HeaderMap};
use hyper::{Method, Uri};

use crate::model::route::{Backend, Entry, HeaderModifier, PathMatch, PathModifier, Router, Rule};

/// What a request is routed by.
#[derive(Debug, Clone, Copy)]
pub struct Head<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
}

impl Head<'_> {
    fn path(&self) -> &str {
        self.uri.path()
    }

    /// The host the client named, without a port.
    fn host(&self) -> &str {
        let h = self.uri.authority().map(|a| a.as_str()).or_else(|| self.headers.get(header::HOST)?.to_str().ok());
        strip_port(h.unwrap_or(""))
    }

    /// The first value of query parameter `name`, as written.
    fn query(&self, name: &str) -> Option<&str> {
        self.uri.query()?.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == name).then_some(v)
        })
    }
}

/// `host[:port]` without the port (`[v6]:port` keeps its brackets).
fn strip_port(h: &str) -> &str {
    if let Some(end) = h.strip_prefix('[').and_then(|r| r.find(']')) {
        return &h[..end + 2];
    }
    match h.rsplit_once(':') {
        Some((host, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => h,
    }
}

/// Where a request goes.
#[derive(Debug)]
pub enum Decision<'r> {
    /// No route of the client's side (consumer or producer) is attached
    /// to this port: the Service balances the request itself.
    Service,
    /// No rule matches: 404.
    NotFound,
    /// A RequestRedirect of `entry`'s rule: answered here with `status`
    /// and `location`.
    Redirect { entry: &'r Entry, status: u16, location: String },
    /// To `backend`; None when the rule's backendRefs weigh 0 in all, or
    /// the draw fell on the share of refs that do not resolve: 500.
    /// `prefix` is the PathPrefix the rule matched, for a rewrite;
    /// `entry` the match that won.
    Forward { entry: &'r Entry, rule: &'r Rule, backend: Option<&'r Backend>, prefix: Option<&'r str> },
}

/// The decision for `head`, sent to port `port` of the router's Service
/// by a client of namespace `client_ns` (None: not a workload of the
/// mesh), with `unit` in [0, 1) choosing among weighted backends.
///
/// A namespace with consumer routes for the Service (routes in that
/// namespace, not the Service's) sees only those; every other client sees
/// the Service's own (producer) routes.
pub fn decide<'r>(router: &'r Router, port: u16, client_ns: Option<&str>, head: &Head<'_>, unit: f64) -> Decision<'r> {
    let ns = match client_ns {
        Some(c) if router.consumers.iter().any(|n| n.as_str() == c) => c,
        _ => router.parent.namespace.as_str(),
    };
    let Some(entry) = router.candidates(head.path()).find(|e| e.namespace.as_str() == ns && matches(e, port, head))
    else {
        let attached = router.entries.iter().any(|e| e.namespace.as_str() == ns && e.port.is_none_or(|p| p == port));
        return if attached { Decision::NotFound } else { Decision::Service };
    };
    let rule = &router.rules[entry.rule];
    let prefix = match &entry.matches.path {
        PathMatch::Prefix(p) => Some(p.as_str()),
        _ => None,
    };
    if let Some(r) = &rule.filters.redirect {
        let scheme = r.scheme.as_deref().unwrap_or("http");
        let host = r.hostname.as_deref().unwrap_or_else(|| head.host());
        let port = r.port.or_else(|| r.scheme.is_none().then_some(port));
        let default_port = if scheme == "https" { 443 } else { 80 };
        let authority = match port {
            Some(p) if p != default_port => format!("{host}:{p}"),
            _ => host.to_owned(),
        };
        let path = match &r.path {
            Some(m) => modified_path(head.path(), prefix, m),
            None => head.path().to_owned(),
        };
        let query = head.uri.query().map_or(String::new(), |q| format!("?{q}"));
        let location = format!("{scheme}://{authority}{path}{query}");
        return Decision::Redirect { entry, status: r.status, location };
    }
    Decision::Forward { entry, rule, backend: weighted(rule, unit), prefix }
}

fn matches(e: &Entry, port: u16, head: &Head<'_>) -> bool {
    let m = &e.matches;
    e.port.is_none_or(|p| p == port)
        && m.path.matches(head.path())
        && m.method.as_ref().is_none_or(|want| want == head.method)
        && m.headers
            .iter()
            .all(|(name, v)| head.headers.get_all(name).iter().any(|h| h.to_str().is_ok_and(|h| v.matches(h))))
        && m.query.iter().all(|(name, v)| head.query(name).is_some_and(|q| v.matches(q)))
}

/// A backend drawn with probability proportional to its weight; weight 0
/// gets nothing. None: every weight is 0, or the draw fell on the weight
/// of the refs that do not resolve (counted in the total, not listed).
fn weighted(rule: &Rule, unit: f64) -> Option<&Backend> {
    let total = rule.total_weight;
    if total == 0 {
        return None;
    }
    let mut at = ((unit.clamp(0.0, 1.0) * total as f64) as u64).min(total - 1);
    for b in &rule.backends {
        if at < u64::from(b.weight) {
            return Some(b);
        }
        at -= u64::from(b.weight);
    }
    None
}

/// `path` with the modifier applied: a full replacement, or the matched
/// `prefix` replaced (whole segments; `/` as the replacement strips it).
pub fn modified_path(path: &str, prefix: Option<&str>, m: &PathModifier) -> String {
    match m {
        PathModifier::Full(p) => p.clone(),
        PathModifier::Prefix(with) => {
            let rest = match prefix {
                Some("/") | None => path,
                Some(p) => path.strip_prefix(p).unwrap_or(path),
            };
            let with = with.trim_end_matches('/');
            match (with.is_empty(), rest.is_empty() || rest == "/") {
                (true, true) => "/".to_owned(),
                (true, false) => rest.to_owned(),
                (false, true) if rest.is_empty() => with.to_owned(),
                (false, _) => format!("{with}{rest}"),
            }
        }
    }
}

/// Applies a header modifier: `set` replaces, `add` appends, `remove`
/// drops (names are case-insensitive).
pub fn modify_headers(h: &mut HeaderMap, m: &HeaderModifier) {
    for (n, v) in &m.set {
        h.insert(n.clone(), v.clone());
    }
    for (n, v) in &m.add {
        h.append(n.clone(), v.clone());
    }
    for n in &m.remove {
        h.remove(n);
    }
}

/// The request as the rule and its backend send it on: request header
/// modifiers (the rule's, then the backend's), then a URL rewrite of the
/// path and host (`uri` in absolute form).
pub fn rewrite_request(uri: &mut Uri, headers: &mut HeaderMap, rule: &Rule, backend: &Backend, prefix: Option<&str>) {
    for m in [&rule.filters.request_headers, &backend.filters.request_headers].into_iter().flatten() {
        modify_headers(headers, m);
    }
    let Some(rw) = &rule.filters.rewrite else { return };
    let mut parts = std::mem::take(uri).into_parts();
    if let Some(m) = &rw.path {
        let pq = parts.path_and_query.as_ref();
        let path = modified_path(pq.map_or("/", |p| p.path()), prefix, m);
        let q = pq.and_then(|p| p.query()).map_or(String::new(), |q| format!("?{q}"));
        parts.path_and_query = format!("{path}{q}").parse().ok().or(parts.path_and_query);
    }
    if let Some(host) = &rw.hostname {
        if let Ok(a) = host.to_str().unwrap_or("").parse() {
            parts.authority = Some(a);
        }
        headers.insert(header::HOST, host.clone());
    }
    *uri = Uri::from_parts(parts).unwrap_or_default();
}

/// The response as the rule and its backend return it: response header
/// modifiers (the backend's, then the rule's).
pub fn rewrite_response(headers: &mut HeaderMap, rule: &Rule, backend: &Backend) {
    for m in [&backend.filters.response_headers, &rule.filters.response_headers].into_iter().flatten() {
        modify_headers(headers, m);
    }
}

#[cfg(test)]
#[path = "router_tests.rs"]
mod tests;
