//! Traffic routing on the mesh (Gateway API GAMMA): `HTTPRoute` objects
//! whose `parentRefs` name a Service take over that Service's requests and
//! send each to one of their rules' `backendRefs`, or answer it directly
//! (a redirect, 404, 500).
//!
//! [`compile`] checks the documents ([`doc`]) against the state's services
//! and compiles them once per write into one [`Router`] per parent
//! Service: every (rule, match) pair of every route attached to it, in
//! the Gateway API's precedence order, regular expressions compiled. The
//! decision itself (which entry, which backend) is the proxy's
//! (`proxy::http::router`): it runs per request against the snapshot.

mod compile;
pub mod doc;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hyper::header::{HeaderName, HeaderValue};

pub(in crate::model) use compile::compile;
pub use compile::{check, Find, ServiceShape};
pub use doc::{ReferenceGrantDoc, RouteDoc};

use super::{Name, PortKey, ServiceKey};

/// A route as logs and metrics name it: `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteKey {
    pub namespace: Name,
    pub name: Name,
}

impl std::fmt::Display for RouteKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Every route of a state, compiled: the routers by parent Service.
#[derive(Debug, Default)]
pub struct Routes {
    /// The documents it was compiled from, and the grants: two `Routes`
    /// are equal when these are and the same refs do not resolve.
    pub docs: Vec<Arc<RouteDoc>>,
    pub grants: Vec<Arc<ReferenceGrantDoc>>,
    /// The backendRefs (and mirrors) written right that name nothing the
    /// route may use, in document order: their share of requests is
    /// answered 500 (a mirror's is not sent), and the route's status says
    /// `ResolvedRefs=False`.
    pub unresolved: Vec<Unresolved>,
    pub by_parent: HashMap<ServiceKey, Arc<Router>>,
}

impl PartialEq for Routes {
    fn eq(&self, other: &Self) -> bool {
        self.docs == other.docs && self.grants == other.grants && self.unresolved == other.unresolved
    }
}

/// Why a backendRef does not resolve: the Gateway API's `ResolvedRefs`
/// reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefReason {
    /// Not a Service.
    InvalidKind,
    /// In another namespace, with no ReferenceGrant that allows it.
    RefNotPermitted,
    /// No such Service, or no such port of it.
    BackendNotFound,
}

impl RefReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RefReason::InvalidKind => "InvalidKind",
            RefReason::RefNotPermitted => "RefNotPermitted",
            RefReason::BackendNotFound => "BackendNotFound",
        }
    }
}

/// One backendRef that does not resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unresolved {
    /// Index of its route in the document's `routes`.
    pub route: usize,
    /// Its field path (`routes[0].spec.rules[1].backendRefs[0]`).
    pub path: String,
    pub reason: RefReason,
    pub message: String,
}

impl std::fmt::Display for Unresolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} ({})", self.path, self.message, self.reason.as_str())
    }
}

/// Whether `grants` let a route of kind `from.0` in namespace `from.1`
/// name Service `to.1` of namespace `to.0`: a grant in the Service's
/// namespace whose `from` has the route's kind and namespace and whose
/// `to` has Services (all, or that one by name). The same answer for the
/// proxy's routing and for the status a cluster's routes get.
pub fn permits(grants: &[Arc<ReferenceGrantDoc>], from: (&str, &str), to: (&str, &str)) -> bool {
    grants.iter().filter(|g| g.metadata.namespace == to.0).any(|g| {
        g.spec.from.iter().any(|f| f.group == "gateway.networking.k8s.io" && f.kind == from.0 && f.namespace == from.1)
            && g.spec
                .to
                .iter()
                .any(|t| t.group.is_empty() && t.kind == "Service" && t.name.as_deref().is_none_or(|n| n == to.1))
    })
}

impl Routes {
    /// The router of the routes attached to `service`, if any is.
    pub fn router(&self, service: &ServiceKey) -> Option<&Arc<Router>> {
        self.by_parent.get(service)
    }

    /// Every (route, rule, backend) a request can be counted under: each
    /// rule with each of its backends, and with `""` (answered by the
    /// proxy: a redirect, 500).
    pub fn series_keys(&self) -> std::collections::HashSet<(Arc<str>, Arc<str>, Arc<str>)> {
        let none: Arc<str> = Arc::from("");
        self.by_parent
            .values()
            .flat_map(|r| &r.rules)
            .flat_map(|rule| {
                let key = move |b: &Arc<str>| (rule.label.clone(), rule.name.clone(), b.clone());
                rule.backends.iter().map(move |b| key(&b.label)).chain(std::iter::once(key(&none)))
            })
            .collect()
    }
}

/// Entries by the first segment of the paths they match. Read on every
/// routed request with a segment the client wrote: foldhash, seeded per
/// process (the keys are the routes', so a client can only miss them).
pub type SegmentIndex = HashMap<String, Vec<usize>, foldhash::fast::RandomState>;

/// The routes attached to one parent Service.
#[derive(Debug)]
pub struct Router {
    pub parent: ServiceKey,
    /// Every (rule, match) pair of every attached route, best first as
    /// the Gateway API orders them; consumer routes (of a namespace other
    /// than the Service's) are among them, marked by their namespace.
    pub entries: Vec<Entry>,
    pub rules: Vec<Arc<Rule>>,
    /// The namespaces that have consumer routes for this Service: their
    /// clients see only those, the others only the producer routes.
    pub consumers: Vec<Name>,
    /// The entries a request may match, by the first segment of its
    /// path (indices into `entries`, in precedence order, the entries that
    /// match any path merged in): a request checks only those, not every
    /// entry. None: too large an index; every request checks `generic`,
    /// which is then every entry.
    pub by_segment: Option<SegmentIndex>,
    /// The entries that may match any path (a prefix `/`, a regular
    /// expression), for a segment no entry names.
    pub generic: Vec<usize>,
}

impl Router {
    /// The entries a request for `path` may match, in precedence order.
    pub fn candidates<'a>(&'a self, path: &str) -> impl Iterator<Item = &'a Entry> + 'a {
        let seg = compile::first_segment(path);
        let list = self.by_segment.as_ref().and_then(|b| b.get(seg)).unwrap_or(&self.generic);
        list.iter().map(|&i| &self.entries[i])
    }
}

impl Router {
    /// Whether routes attached to this Service take port `port`'s
    /// requests (a parentRef without a port takes every port).
    pub fn takes(&self, port: u16) -> bool {
        self.entries.iter().any(|e| e.port.is_none_or(|p| p == port))
    }
}

/// One match of one rule, as precedence orders them.
#[derive(Debug)]
pub struct Entry {
    /// The parentRef's port; None: every port of the Service.
    pub port: Option<u16>,
    /// The route's namespace: a consumer route's applies only to the
    /// clients of that namespace.
    pub namespace: Name,
    pub matches: Match,
    /// Index into [`Router::rules`].
    pub rule: usize,
    /// Where it is written: `spec.rules[.0].matches[.1]` of its route.
    pub at: (usize, usize),
}

/// One rule of a route: what a request it matches gets.
#[derive(Debug)]
pub struct Rule {
    pub route: RouteKey,
    /// `route` as logs and metrics write it.
    pub label: Arc<str>,
    /// Its `name`, else its index, as metrics and logs write it.
    pub name: Arc<str>,
    pub filters: Filters,
    /// The backendRefs that resolve. None of them: the rule answers with
    /// a redirect, or with 500.
    pub backends: Vec<Backend>,
    /// The sum of every backendRef's weight, for the per-request draw,
    /// those that do not resolve included: a draw past the backends'
    /// weights lands on them, and is answered 500.
    pub total_weight: u64,
    /// `timeouts.request`: the whole request, retries included.
    pub timeout: Option<Duration>,
    /// `timeouts.backendRequest`: each try.
    pub backend_timeout: Option<Duration>,
    /// `retry`, on the backend's retry machinery (idempotent methods, the
    /// retry budget, bodies up to 64 KiB kept).
    pub retry: Option<crate::model::http::RetryPolicy>,
}

/// A backendRef: a service port and its weight.
#[derive(Debug)]
pub struct Backend {
    pub port: PortKey,
    /// `port` as logs and metrics write it.
    pub label: Arc<str>,
    pub weight: u32,
    pub filters: Filters,
}

#[derive(Debug, Default)]
pub struct Filters {
    pub request_headers: Option<HeaderModifier>,
    pub response_headers: Option<HeaderModifier>,
    pub redirect: Option<Redirect>,
    pub rewrite: Option<Rewrite>,
    pub mirrors: Vec<Mirror>,
}

/// A RequestMirror: `numerator / denominator` of the requests are copied
/// to `port`, fire and forget.
#[derive(Debug, Clone, PartialEq)]
pub struct Mirror {
    pub port: PortKey,
    pub numerator: u32,
    pub denominator: u32,
}

impl Mirror {
    /// Whether the request drawn `unit` (in [0, 1)) is copied.
    pub fn takes(&self, unit: f64) -> bool {
        unit * f64::from(self.denominator) < f64::from(self.numerator)
    }
}

#[derive(Debug, Default)]
pub struct HeaderModifier {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PathModifier {
    Full(String),
    /// Replaces the part the rule's PathPrefix matched.
    Prefix(String),
}

#[derive(Debug)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    pub status: u16,
}

#[derive(Debug)]
pub struct Rewrite {
    pub hostname: Option<HeaderValue>,
    pub path: Option<PathModifier>,
}

/// What a request must have to match: every part given.
#[derive(Debug, Clone)]
pub struct Match {
    pub path: PathMatch,
    pub headers: Vec<(HeaderName, ValueMatch)>,
    pub query: Vec<(String, ValueMatch)>,
    pub method: Option<hyper::Method>,
}

#[derive(Debug, Clone)]
pub enum PathMatch {
    Exact(String),
    /// Whole segments: `/v2` matches `/v2`, `/v2/` and `/v2/x`, not
    /// `/v2x`. Kept without a trailing `/`, except the root `/`.
    Prefix(String),
    Regex(regex::Regex),
}

#[derive(Debug, Clone)]
pub enum ValueMatch {
    Exact(String),
    Regex(regex::Regex),
}

impl ValueMatch {
    pub fn matches(&self, v: &str) -> bool {
        match self {
            ValueMatch::Exact(want) => v == want,
            ValueMatch::Regex(r) => r.is_match(v),
        }
    }
}

impl PathMatch {
    /// Whether `path` matches; for a prefix, the length it matched.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(p) if p == "/" => true,
            PathMatch::Prefix(p) => {
                path.strip_prefix(p.as_str()).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
            PathMatch::Regex(r) => r.is_match(path),
        }
    }
}
