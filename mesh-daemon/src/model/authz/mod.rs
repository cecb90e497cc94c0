//! Authorization on the mesh, in the shape of Istio's `AuthorizationPolicy`
//! (`security.istio.io/v1`): which callers may reach which workloads, by
//! the caller's verified identity, namespace and address, and (on request
//! ports) the request's method, path, host, port and headers.
//!
//! [`compile`] checks the documents ([`doc`]) once per write; [`decide`]
//! is the pure evaluation, the same for every placement of client and
//! server and for `meshctl authz check`, in Istio's order: a matching DENY
//! denies; then, if any ALLOW policy applies to the workload, one must
//! match; else the request is allowed. AUDIT policies only say that they
//! matched; a dry-run policy (`istio.io/dry-run: "true"`) is evaluated and
//! reported but never decides.

mod compile;
pub mod doc;
mod gate;

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasherDefault;
use std::net::IpAddr;
use std::sync::Arc;

use hyper::header::{HeaderMap, HeaderName};

pub(in crate::model) use compile::compile;
pub use doc::PolicyDoc;
pub use gate::{gate_hash, path_gate, principal_gate, Gate, Prehashed};

use super::{Name, ServiceKey};

/// The namespace whose policies apply to every namespace.
pub const ROOT_NAMESPACE: &str = "mesh-system";

/// Every policy of a state, compiled.
#[derive(Debug, Default)]
pub struct Policies {
    /// The documents it was compiled from, and the services'
    /// `authorization` (each an ALLOW policy of its own): two `Policies`
    /// are equal when these are.
    pub docs: Vec<Arc<PolicyDoc>>,
    pub from_services: Vec<(ServiceKey, super::Authorization)>,
    pub list: Vec<Arc<Policy>>,
    /// Which policies may apply to a destination, by its service: see
    /// [`Policies::applying`].
    index: Candidates,
}

/// Which policies a request looks at. For each service some policy's
/// `targetRefs` name, the indexes into `list` of those policies and of
/// every policy scoped otherwise (by namespace or selector), in list
/// order, ALLOW apart from the rest; for any other service, the latter
/// alone. A request then looks only at policies that may apply, and asks
/// only the namespace- and selector-scoped ones whether they do.
///
/// A DENY or AUDIT policy with a gate (every rule names exact principals,
/// or exact paths) is not in those lists: it is found by the caller's
/// principal, or the request's path, in its service's [`Gated`] (or, if
/// it is scoped otherwise, in `unscoped`'s, which every request looks
/// in), so a request looks at none of the gated policies it cannot match
/// (with the bench's 19 DENY policies, at none of them), and never at
/// another service's. ALLOW policies are never skipped: one that applies
/// and does not match still denies what no other allows.
#[derive(Debug, Default)]
struct Candidates {
    /// Read on every request (foldhash: the keys are the state's).
    by_service: std::collections::HashMap<ServiceKey, Lists, foldhash::fast::RandomState>,
    unscoped: Lists,
}

/// The policies of one service (or those scoped otherwise), in list
/// order.
#[derive(Debug, Default)]
struct Lists {
    allow: Vec<u32>,
    /// DENY and AUDIT policies without a gate.
    other: Vec<u32>,
    gated: Gated,
}

/// Gated DENY and AUDIT policies.
#[derive(Debug, Default)]
struct Gated {
    /// Those with a principal gate, under each principal's hash.
    by_principal: HashMap<u64, Vec<u32>, BuildHasherDefault<Prehashed>>,
    /// Those with a path gate and no principal gate, under each path's
    /// hash; and all of them (`path_gated`), for a connection, which has
    /// no path (a DENY rule's request parts match it).
    by_path: HashMap<u64, Vec<u32>, BuildHasherDefault<Prehashed>>,
    path_gated: Vec<u32>,
}

impl Gated {
    /// Adds policy `i`, if it has a gate: false if it has none.
    fn add(&mut self, i: u32, p: &Policy) -> bool {
        if let Some(gate) = &p.principal_gate {
            gate.iter().for_each(|h| self.by_principal.entry(*h).or_default().push(i));
        } else if let Some(gate) = &p.path_gate {
            gate.iter().for_each(|h| self.by_path.entry(*h).or_default().push(i));
            self.path_gated.push(i);
        } else {
            return false;
        }
        true
    }

    /// The gated policies a request with `hashes` may match: by its
    /// principal, and by its path (every path-gated one for a
    /// connection).
    fn found(&self, hashes: Hashes) -> [&[u32]; 2] {
        fn at(m: &HashMap<u64, Vec<u32>, BuildHasherDefault<Prehashed>>, h: u64) -> &[u32] {
            m.get(&h).map_or(&[], |v| v)
        }
        let by_principal = hashes.principal.map_or(&[][..], |h| at(&self.by_principal, h));
        let by_path = hashes.path.map_or(&self.path_gated[..], |h| at(&self.by_path, h));
        [by_principal, by_path]
    }
}

impl Policies {
    /// The policies compiled from `docs` and the services' own (`list`).
    pub fn new(
        docs: Vec<Arc<PolicyDoc>>,
        from_services: Vec<(ServiceKey, super::Authorization)>,
        list: Vec<Arc<Policy>>,
    ) -> Self {
        let mut index = Candidates::default();
        for (i, p) in list.iter().enumerate() {
            let i = i as u32;
            let push = |l: &mut Lists| {
                if p.action == Action::Allow {
                    l.allow.push(i);
                } else if !l.gated.add(i, p) {
                    l.other.push(i);
                }
            };
            match &p.scope {
                Scope::Services(keys) => keys.iter().for_each(|k| push(index.by_service.entry(k.clone()).or_default())),
                _ => push(&mut index.unscoped),
            }
        }
        // A service's lists take the ungated policies scoped otherwise in
        // (its gated ones stay apart: a request looks in both).
        for l in index.by_service.values_mut() {
            for (v, unscoped) in [(&mut l.allow, &index.unscoped.allow), (&mut l.other, &index.unscoped.other)] {
                v.extend(unscoped);
                v.sort_unstable();
                v.dedup();
            }
        }
        Policies { docs, from_services, list, index }
    }

    /// The policies that apply to `dest` and that a request with
    /// `hashes` may match, in list order: the ALLOW ones, and the others.
    fn applying<'p: 'd, 'd>(&'p self, dest: &'d Dest<'d>, hashes: Hashes) -> (Walk<'p, 'd>, Walk<'p, 'd>) {
        let unscoped = &self.index.unscoped;
        let (lists, [a, b]) = match self.index.by_service.get(dest.service) {
            Some(l) => (l, l.gated.found(hashes)),
            None => (unscoped, [&[][..], &[][..]]),
        };
        let [c, d] = unscoped.gated.found(hashes);
        let walk = |open, gated| Walk { policies: self, dest, open, gated };
        (walk(&lists.allow, [&[]; 4]), walk(&lists.other, [a, b, c, d]))
    }
}

impl PartialEq for Policies {
    fn eq(&self, other: &Self) -> bool {
        self.docs == other.docs && self.from_services == other.from_services
    }
}

/// Policies in list order from the sorted index lists of a request: its
/// service's (`open`) and the gated ones its principal and path found,
/// the service's and those scoped otherwise. No policy is in two of them;
/// one of `targetRefs` is only in its services' lists, so it applies,
/// and any other is asked.
struct Walk<'p, 'd> {
    policies: &'p Policies,
    dest: &'d Dest<'d>,
    open: &'p [u32],
    gated: [&'p [u32]; 4],
}

impl<'p> Iterator for Walk<'p, '_> {
    type Item = &'p Arc<Policy>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let first = |s: &[u32]| s.first().copied().unwrap_or(u32::MAX);
            let (mut at, mut list) = (first(self.open), &mut self.open);
            for g in &mut self.gated {
                if first(g) < at {
                    (at, list) = (first(g), g);
                }
            }
            if at == u32::MAX {
                return None;
            }
            *list = &list[1..];
            let p = &self.policies.list[at as usize];
            if matches!(p.scope, Scope::Services(_)) || p.applies(self.dest) {
                return Some(p);
            }
        }
    }
}

/// A service's `authorization` as the ALLOW policy it is: its identities
/// (any trust domain) or any workload of its namespaces may reach it, and
/// nothing else. Named `NAMESPACE/SERVICE.authorization`.
pub fn from_service(key: &ServiceKey, a: &super::Authorization) -> Policy {
    let exact = |s: String| Pattern::Exact(s);
    let mut rules = Vec::new();
    if !a.identities.is_empty() {
        let principals = a.identities.iter().map(|i| exact(i.principal().to_owned()));
        rules.push(Rule {
            from: vec![Source { principals: principals.collect(), ..Source::default() }],
            ..Rule::default()
        });
    }
    if !a.namespaces.is_empty() {
        let namespaces = a.namespaces.iter().map(|n| exact(n.to_string())).collect();
        rules.push(Rule { from: vec![Source { namespaces, ..Source::default() }], ..Rule::default() });
    }
    Policy::new(format!("{key}.authorization").into(), Action::Allow, false, Scope::Services(vec![key.clone()]), rules)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    Audit,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
        }
    }
}

/// One policy, compiled.
#[derive(Debug)]
pub struct Policy {
    /// `namespace/name`, as logs and metrics write it.
    pub label: Arc<str>,
    pub action: Action,
    pub dry_run: bool,
    pub scope: Scope,
    /// Empty: the policy matches nothing (an ALLOW policy without rules
    /// allows nothing).
    pub rules: Vec<Rule>,
    /// When every rule asks for one of some exact principals: the hashes
    /// of all of them ([`gate_hash`]). A caller whose principal is not
    /// among them matches no rule, so none is looked at (a collision only
    /// costs the rules' own checks).
    pub principal_gate: Option<Gate>,
    /// The same for paths: when every operation of every rule names exact
    /// `paths`, their hashes. Used for requests only (on a connection, a
    /// DENY rule's request parts match).
    pub path_gate: Option<Gate>,
    /// Each rule's own path gate (as `path_gate`, for that rule alone):
    /// a request for a path none of a rule's operations names skips the
    /// rule's checks, though another rule of the policy (`{}`, a prefix)
    /// keeps the policy's gate off.
    pub rule_path_gates: Vec<Option<Gate>>,
    /// `label#i` for each rule, as logs name the rule that decided.
    pub rule_labels: Vec<Arc<str>>,
}

impl Policy {
    /// The policy, with its gates and rule labels made once.
    pub fn new(label: Arc<str>, action: Action, dry_run: bool, scope: Scope, rules: Vec<Rule>) -> Self {
        let rule_labels = (0..rules.len()).map(|i| Arc::from(format!("{label}#{i}"))).collect();
        let (principal_gate, path_gate) = (principal_gate(&rules), path_gate(&rules));
        let rule_path_gates = rules.iter().map(|r| gate::path_gate(std::slice::from_ref(r))).collect();
        Policy { label, action, dry_run, scope, rules, principal_gate, path_gate, rule_path_gates, rule_labels }
    }
}

/// The annotation that makes a policy dry-run (`"true"`): evaluated and
/// logged, not enforced.
pub const DRY_RUN: &str = "istio.io/dry-run";

/// Which workloads a policy applies to.
#[derive(Debug, Clone, PartialEq)]
pub enum Scope {
    /// Every workload of the namespace; None: of every namespace (a
    /// policy of the root namespace).
    Namespace(Option<Name>),
    /// The workloads behind these Services (`targetRefs`), reached as
    /// those Services.
    Services(Vec<ServiceKey>),
    /// The workloads of the namespace (None: of every namespace) with all
    /// these labels.
    Selector(Option<Name>, Vec<(String, String)>),
}

/// One rule: every part given must match.
#[derive(Debug, Default)]
pub struct Rule {
    /// Any one of them (none: any caller).
    pub from: Vec<Source>,
    /// Any one of them (none: any operation).
    pub to: Vec<Operation>,
    /// All of them.
    pub when: Vec<Condition>,
}

/// A `from.source`: every field given must match.
#[derive(Debug, Default)]
pub struct Source {
    pub principals: Vec<Pattern>,
    pub not_principals: Vec<Pattern>,
    pub namespaces: Vec<Pattern>,
    pub not_namespaces: Vec<Pattern>,
    pub ip_blocks: Vec<Cidr>,
    pub not_ip_blocks: Vec<Cidr>,
}

/// A `to.operation`: every field given must match.
#[derive(Debug, Default)]
pub struct Operation {
    pub hosts: Vec<Pattern>,
    pub not_hosts: Vec<Pattern>,
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
    pub methods: Vec<Pattern>,
    pub not_methods: Vec<Pattern>,
    pub paths: Vec<Pattern>,
    pub not_paths: Vec<Pattern>,
}

impl Operation {
    /// Whether it says anything of the request (not only of the port): a
    /// connection on a `tcp` port has no request to match it against.
    fn has_l7(&self) -> bool {
        !(self.hosts.is_empty()
            && self.not_hosts.is_empty()
            && self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty())
    }
}

/// A `when` condition: one of `values` (if any), none of `not_values`.
#[derive(Debug)]
pub struct Condition {
    pub key: ConditionKey,
    pub values: Vec<Pattern>,
    pub not_values: Vec<Pattern>,
}

#[derive(Debug)]
pub enum ConditionKey {
    /// `request.headers[NAME]`: a request's header (L7).
    Header(HeaderName),
    /// `source.principal`.
    Principal,
}

/// Istio's string match: exact, `prefix*`, `*suffix`, or `*` (present).
#[derive(Debug, Clone, PartialEq)]
pub enum Pattern {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl Pattern {
    pub fn matches(&self, v: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(p) => v == p,
            Pattern::Prefix(p) => v.starts_with(p.as_str()),
            Pattern::Suffix(p) => v.ends_with(p.as_str()),
        }
    }
}

/// An address block: `10.0.0.0/8`, `fd00::/8`, or one address.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V6(v6)) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            _ => ip,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(net) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.len)).unwrap_or(0);
                u128::from(net) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// The workload a request or connection is for.
#[derive(Debug, Clone, Copy)]
pub struct Dest<'a> {
    /// The Service it was reached as.
    pub service: &'a ServiceKey,
    /// The workload's namespace (the Service's, for an endpoint that is
    /// not an enrolled workload).
    pub namespace: &'a str,
    /// The workload's labels; None: not an enrolled workload (no selector
    /// matches it).
    pub labels: Option<&'a BTreeMap<String, String>>,
    /// The port the workload serves it on.
    pub port: u16,
}

/// Who is calling.
#[derive(Debug, Clone, Copy, Default)]
pub struct Caller<'a> {
    /// Its verified identity without `spiffe://`
    /// (`cluster.local/ns/shop/sa/web`); None: not a workload of the mesh.
    pub principal: Option<&'a str>,
    /// Its namespace, from its identity.
    pub namespace: Option<&'a str>,
    pub ip: Option<IpAddr>,
}

/// What a request says (none for a connection on a `tcp` port).
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub host: &'a str,
    pub headers: &'a HeaderMap,
}

/// Why a request was allowed or denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// A DENY policy matched (`by`).
    Denied,
    /// An ALLOW policy matched (`by`).
    Allowed,
    /// ALLOW policies apply to the workload and none matched.
    NoAllowMatched,
    /// No ALLOW or DENY policy applies.
    NoPolicy,
}

/// The decision, with the policy and rule that made it.
#[derive(Debug)]
pub struct Verdict<'p> {
    pub allowed: bool,
    pub why: Why,
    /// The policy and the index of its rule that decided.
    pub by: Option<(&'p Policy, usize)>,
    /// AUDIT policies that matched (with the rule).
    pub audited: Vec<(&'p Policy, usize)>,
    /// Dry-run policies that would have decided otherwise than `allowed`
    /// (a dry-run DENY that matched, a dry-run ALLOW that did not).
    pub dry_run: Vec<&'p Policy>,
}

impl Policy {
    /// Whether it applies to `dest`.
    pub fn applies(&self, dest: &Dest<'_>) -> bool {
        let ns_ok = |ns: &Option<Name>| ns.as_ref().is_none_or(|n| n.as_str() == dest.namespace);
        match &self.scope {
            Scope::Namespace(ns) => ns_ok(ns),
            Scope::Services(keys) => keys.contains(dest.service),
            Scope::Selector(ns, labels) => {
                ns_ok(ns)
                    && dest.labels.is_some_and(|have| labels.iter().all(|(k, v)| have.get(k).is_some_and(|h| h == v)))
            }
        }
    }

    /// The first rule that matches, by index (`hashes`: the caller's
    /// principal's and the request's path's [`gate_hash`], for the gates).
    fn matching(
        &self,
        dest: &Dest<'_>,
        (caller, hashes): (&Caller<'_>, Hashes),
        req: Option<&Request<'_>>,
    ) -> Option<usize> {
        if let Some(gate) = &self.principal_gate {
            if !hashes.principal.is_some_and(|h| gate.contains(&h)) {
                return None;
            }
        }
        if let (Some(gate), Some(path)) = (&self.path_gate, hashes.path) {
            if !gate.contains(&path) {
                return None;
            }
        }
        let gated = |g: &Option<Gate>| matches!((g, hashes.path), (Some(g), Some(h)) if !g.contains(&h));
        self.rules
            .iter()
            .zip(&self.rule_path_gates)
            .position(|(r, g)| !gated(g) && r.matches(self.action, dest, caller, req))
    }
}

impl Rule {
    /// On a connection without a request (`req` None), a part that speaks
    /// of the request never matches in an ALLOW policy and always matches
    /// in a DENY or AUDIT one: what cannot be checked is not allowed, and
    /// is denied (Istio's rule for TCP).
    fn matches(&self, action: Action, dest: &Dest<'_>, caller: &Caller<'_>, req: Option<&Request<'_>>) -> bool {
        // Each part only if the ones before matched: a request is checked
        // against every rule of every policy that applies.
        let unknown = action != Action::Allow;
        let from = || self.from.is_empty() || self.from.iter().any(|s| s.matches(caller));
        let to = || {
            self.to.is_empty()
                || self.to.iter().any(|o| match req {
                    None if o.has_l7() => unknown && ports_match(o, dest.port),
                    None => ports_match(o, dest.port),
                    Some(r) => ports_match(o, dest.port) && o.matches_request(r),
                })
        };
        let when = || {
            self.when.iter().all(|c| match (&c.key, req) {
                (ConditionKey::Header(_), None) => unknown,
                (ConditionKey::Header(name), Some(r)) => {
                    let values: Vec<&str> = r.headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect();
                    !values.is_empty() && c.values_match(&values)
                }
                (ConditionKey::Principal, _) => caller.principal.is_some_and(|p| c.values_match(&[p])),
            })
        };
        from() && to() && when()
    }
}

impl Condition {
    fn values_match(&self, values: &[&str]) -> bool {
        let any = |ps: &[Pattern]| values.iter().any(|v| ps.iter().any(|p| p.matches(v)));
        (self.values.is_empty() || any(&self.values)) && !any(&self.not_values)
    }
}

/// One of `yes` (when given) and none of `no`, for `value` (None: the
/// caller has none, which matches no `yes` and no `no`).
fn one_of(yes: &[Pattern], no: &[Pattern], value: Option<&str>) -> bool {
    let hit = |ps: &[Pattern]| value.is_some_and(|v| ps.iter().any(|p| p.matches(v)));
    (yes.is_empty() || hit(yes)) && !hit(no)
}

fn ports_match(o: &Operation, port: u16) -> bool {
    (o.ports.is_empty() || o.ports.contains(&port)) && !o.not_ports.contains(&port)
}

impl Source {
    fn matches(&self, c: &Caller<'_>) -> bool {
        let ip = |blocks: &[Cidr]| c.ip.is_some_and(|ip| blocks.iter().any(|b| b.contains(ip)));
        one_of(&self.principals, &self.not_principals, c.principal)
            && one_of(&self.namespaces, &self.not_namespaces, c.namespace)
            && (self.ip_blocks.is_empty() || ip(&self.ip_blocks))
            && !ip(&self.not_ip_blocks)
    }
}

impl Operation {
    fn matches_request(&self, r: &Request<'_>) -> bool {
        let hosts = || {
            if self.hosts.is_empty() && self.not_hosts.is_empty() {
                return true;
            }
            // Patterns are lowercase; a host is lowered only when one is
            // asked about.
            let host = r.host.to_ascii_lowercase();
            one_of(&self.hosts, &self.not_hosts, Some(&host))
        };
        one_of(&self.methods, &self.not_methods, Some(r.method))
            && one_of(&self.paths, &self.not_paths, Some(r.path))
            && hosts()
    }
}

/// A request's keys for the policies' gates, hashed once.
#[derive(Clone, Copy)]
struct Hashes {
    principal: Option<u64>,
    path: Option<u64>,
}

/// The decision for a request (`req`; None: a connection on a `tcp`
/// port) from `caller` to `dest`, by every policy of `policies` that
/// applies to it.
pub fn decide<'p>(
    policies: &'p Policies,
    dest: &Dest<'_>,
    caller: &Caller<'_>,
    req: Option<&Request<'_>>,
) -> Verdict<'p> {
    let mut v = Verdict { allowed: true, why: Why::NoPolicy, by: None, audited: Vec::new(), dry_run: Vec::new() };
    let hashes = Hashes { principal: caller.principal.map(gate_hash), path: req.map(|r| gate_hash(r.path)) };
    let (allowing, others) = policies.applying(dest, hashes);
    let who = (caller, hashes);
    let mut denied = None;
    for p in others {
        let Some(rule) = p.matching(dest, who, req) else { continue };
        match (p.action, p.dry_run) {
            (Action::Audit, _) => v.audited.push((p, rule)),
            (Action::Deny, true) => v.dry_run.push(p),
            (_, false) => {
                denied.get_or_insert((p.as_ref(), rule));
            }
            _ => {}
        }
    }
    if let Some(by) = denied {
        return Verdict { allowed: false, why: Why::Denied, by: Some(by), ..v };
    }
    let mut any_allow = false;
    for p in allowing {
        let rule = p.matching(dest, who, req);
        if p.dry_run {
            v.dry_run.extend(rule.is_none().then_some(p.as_ref()));
            continue;
        }
        any_allow = true;
        if let Some(rule) = rule {
            if v.by.is_none() {
                v.by = Some((p, rule));
                v.why = Why::Allowed;
            }
        }
    }
    if any_allow && v.by.is_none() {
        v.allowed = false;
        v.why = Why::NoAllowMatched;
    }
    v
}

/// What stands in for a policy that cannot be used as written (from a
/// cluster, where a bad object must not hold back the others): it fails
/// closed, as Istio does. A broken ALLOW policy becomes an ALLOW policy
/// without rules (so it allows nothing, and what no other ALLOW policy
/// allows is denied); a broken DENY one denies everything; a broken
/// AUDIT one is dropped (None). It keeps the policy's name, its dry-run
/// annotation, and its `selector` or `targetRefs` when those alone are
/// well formed (`spec`, the object's spec as written); else it applies
/// to the policy's whole namespace.
pub fn fail_closed(name: &str, namespace: &str, dry_run: bool, spec: &serde_json::Value) -> Option<PolicyDoc> {
    let action = spec.get("action").and_then(|a| a.as_str()).unwrap_or("ALLOW");
    let rules = match action {
        "AUDIT" => return None,
        "DENY" => vec![doc::RuleDoc::default()],
        _ => Vec::new(),
    };
    let selector: Option<doc::SelectorDoc> = spec.get("selector").and_then(|v| serde_json::from_value(v.clone()).ok());
    let target_refs: Vec<doc::TargetRefDoc> =
        spec.get("targetRefs").and_then(|v| serde_json::from_value(v.clone()).ok()).unwrap_or_default();
    let mut annotations = std::collections::BTreeMap::new();
    if dry_run {
        annotations.insert(DRY_RUN.to_owned(), "true".to_owned());
    }
    let stand_in = |selector, target_refs| PolicyDoc {
        api_version: "security.istio.io/v1".into(),
        kind: "AuthorizationPolicy".into(),
        metadata: doc::PolicyMetadataDoc {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            annotations: annotations.clone(),
        },
        spec: doc::PolicySpecDoc {
            selector,
            target_refs,
            action: Some(if action == "DENY" { "DENY" } else { "ALLOW" }.into()),
            rules: rules.clone(),
        },
        status: None,
    };
    let scoped = stand_in(selector, target_refs);
    let mut e = super::errors::Errors::default();
    let ok = compile::policy(&mut e, "p", &scoped).is_some();
    Some(if ok { scoped } else { stand_in(None, Vec::new()) })
}

#[cfg(test)]
mod tests;
