//! The serving side's authorization: one decision per connection (on a
//! `tcp` port) or per request, made by the proxy that hands it to a
//! workload of its own node, whether the client is on this node (the
//! outbound path, before it dials a local endpoint) or on another (the
//! tunnel's inbound path). Both ask the same [`Guard`], so where the
//! scheduler put the two pods never changes a decision. The evaluation
//! itself is the model's ([`crate::model::authz::decide`]).

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasherDefault;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use prometheus_client::metrics::counter::Counter;
use tracing::{info, warn};

use crate::model::authz::{decide, Caller, Dest, Policies, Policy, Request, Verdict, Why};
use crate::model::{Identity, ServiceKey, State};
use crate::telemetry::metrics::{AuthzLabels, Metrics};

/// What the serving side knows of a workload of its node.
#[derive(Debug)]
struct Served {
    namespace: String,
    labels: BTreeMap<String, String>,
}

/// The policies of one state and its workloads.
#[derive(Debug, Default)]
pub struct Guard {
    policies: Arc<Policies>,
    /// Every workload by address (an endpoint on another node is handed
    /// its connections directly when its service has `mtls: disabled`).
    workloads: HashMap<IpAddr, Served>,
    /// Workload addresses by identity, anywhere: a caller's address is
    /// believed only when a workload of its identity has it.
    addresses: HashMap<Identity, Vec<IpAddr>>,
    /// Each workload's identity, by address (the `By=` of
    /// `x-forwarded-client-cert`).
    identities: HashMap<IpAddr, Identity>,
    /// The second a denial was last logged (one line a second).
    logged: AtomicU64,
    /// Whether any policy looks at the caller's address (`ipBlocks`,
    /// `notIpBlocks`): if none does, it is not looked up.
    uses_addresses: bool,
    /// Each policy's `mesh_authz_decisions_total` series, by the policy's
    /// address, found on first use: a decision costs no label lookup.
    series: HashMap<usize, PolicySeries, BuildHasherDefault<AddressHash>>,
    /// The series of requests no ALLOW policy matched.
    no_allow_match: OnceLock<Counter>,
}

/// One policy's series: its own decision (allow or deny, by its action),
/// audit, and dry-run.
#[derive(Debug, Default)]
struct PolicySeries([OnceLock<Counter>; 3]);

/// The hasher of [`Guard::series`]: an address spread by one multiply.
#[derive(Default)]
struct AddressHash(u64);

impl std::hash::Hasher for AddressHash {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn write_usize(&mut self, n: usize) {
        self.0 = (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A request or connection refused, and by which policy and rule (None:
/// ALLOW policies apply and none matched).
#[derive(Debug, Clone)]
pub struct Denied {
    pub by: Option<(Arc<str>, usize)>,
    /// The AUDIT policies that matched, as [`Logged::audit`].
    pub audit: Option<String>,
}

/// What a request's access log line says of the policies: the policy and
/// rule that decided (`ns/name#rule`, or `no-allow-match`), when one did,
/// and the AUDIT policies and rules that matched (comma-separated).
#[derive(Debug, Clone, Default)]
pub struct Logged {
    pub by: Option<Arc<str>>,
    pub audit: Option<String>,
}

impl Denied {
    /// For the access log.
    pub fn logged(&self) -> Logged {
        Logged { by: Some(self.label().into()), audit: self.audit.clone() }
    }

    /// `policy#rule`, or `no-allow-match`, for the access log's `authz`.
    pub fn label(&self) -> String {
        match &self.by {
            Some((p, r)) => format!("{p}#{r}"),
            None => "no-allow-match".into(),
        }
    }

    /// `policy#rule`, or `no ALLOW policy matched`, for logs.
    pub fn describe(&self) -> String {
        match &self.by {
            Some((p, r)) => format!("{p}#{r}"),
            None => "no ALLOW policy matched".into(),
        }
    }
}

impl Guard {
    /// The guard of `state` (`trust_domain` names identities).
    pub fn build(state: &State, trust_domain: &str) -> Self {
        let workloads = state
            .workloads
            .iter()
            .flat_map(|w| {
                w.ips.iter().map(|ip| (ip, Served { namespace: w.namespace.to_string(), labels: w.labels.clone() }))
            })
            .collect();
        let mut addresses: HashMap<Identity, Vec<IpAddr>> = HashMap::new();
        let mut identities = HashMap::new();
        for w in &state.workloads {
            let id = Identity::workload(trust_domain, &w.namespace, &w.service_account);
            addresses.entry(id.clone()).or_default().extend(w.ips.iter());
            for ip in w.ips.iter() {
                identities.insert(ip, id.clone());
            }
        }
        let policies = state.policies.clone();
        let uses_addresses = policies.list.iter().any(|p| {
            p.rules.iter().any(|r| r.from.iter().any(|s| !s.ip_blocks.is_empty() || !s.not_ip_blocks.is_empty()))
        });
        let series = policies.list.iter().map(|p| (Arc::as_ptr(p) as usize, PolicySeries::default())).collect();
        Guard {
            policies,
            workloads,
            addresses,
            identities,
            logged: AtomicU64::new(0),
            uses_addresses,
            series,
            no_allow_match: OnceLock::new(),
        }
    }

    /// The identity of the workload at `ip`, if it is one.
    pub fn identity_at(&self, ip: IpAddr) -> Option<&Identity> {
        self.identities.get(&ip)
    }

    /// Whether any policy is in force (else every decision is allow, and
    /// the caller may skip building one).
    pub fn enforcing(&self) -> bool {
        !self.policies.list.is_empty()
    }

    /// The caller as policies see it: `identity` (verified) and, when a
    /// workload of that identity has it, `ip`.
    pub fn caller<'a>(&self, identity: Option<&'a Identity>, ip: Option<IpAddr>) -> Caller<'a> {
        let ip = ip
            .map(|ip| ip.to_canonical())
            .filter(|_| self.uses_addresses)
            .filter(|ip| identity.is_some_and(|id| self.addresses.get(id).is_some_and(|l| l.contains(ip))));
        Caller { principal: identity.map(Identity::principal), namespace: identity.and_then(|i| i.namespace()), ip }
    }

    /// The policies' verdict for `caller` reaching `target` as `service`
    /// with `req`: the evaluation alone (what `meshctl authz check`
    /// prints), nothing counted or logged.
    pub fn verdict(
        &self,
        service: &ServiceKey,
        target: SocketAddr,
        caller: &Caller<'_>,
        req: Option<&Request<'_>>,
    ) -> Verdict<'_> {
        let served = self.workloads.get(&target.ip());
        let dest = Dest {
            service,
            namespace: served.map_or(service.namespace.as_str(), |s| s.namespace.as_str()),
            labels: served.map(|s| &s.labels),
            port: target.port(),
        };
        decide(&self.policies, &dest, caller, req)
    }

    /// The decision for `caller` reaching `target` (a workload of this
    /// node, or another endpoint it hands connections to) as `service`,
    /// with request `req` (None: a connection on a `tcp` port). Counted in
    /// `mesh_authz_decisions_total`; a denial is logged (once a second on
    /// `env`'s clock, read for a denial only).
    /// Ok with what the access log says: the ALLOW policy and rule that
    /// decided, when one did, and the AUDIT ones that matched.
    pub fn check(
        &self,
        service: &ServiceKey,
        target: SocketAddr,
        caller: &Caller<'_>,
        req: Option<&Request<'_>>,
        metrics: &Metrics,
        env: &dyn crate::env::Env,
    ) -> Result<Logged, Denied> {
        if !self.enforcing() {
            return Ok(Logged::default());
        }
        let v = self.verdict(service, target, caller, req);
        self.count(&v, metrics);
        for p in &v.dry_run {
            info!(policy = %p.label, service = %service, caller = caller.principal.unwrap_or("-"), "dry-run policy would decide otherwise; not enforced");
        }
        let audit = (!v.audited.is_empty())
            .then(|| v.audited.iter().map(|(p, r)| &*p.rule_labels[*r]).collect::<Vec<_>>().join(","));
        if v.allowed {
            return Ok(Logged { by: v.by.map(|(p, r)| p.rule_labels[r].clone()), audit });
        }
        let denied = Denied { by: v.by.map(|(p, r)| (p.label.clone(), r)), audit };
        let now_secs = env.secs() as u64;
        if self.logged.swap(now_secs, Ordering::Relaxed) != now_secs {
            warn!(service = %service, %target, caller = caller.principal.unwrap_or("-"), by = %denied.describe(), "denied by authorization policy (logged once a second)");
        }
        Err(denied)
    }
}

impl Guard {
    fn count(&self, v: &Verdict<'_>, metrics: &Metrics) {
        let series = |policy: &Arc<str>, action: &'static str, decision: &'static str| {
            metrics.authz_decisions.get_or_create(&AuthzLabels { policy: policy.clone(), action, decision }).clone()
        };
        let inc = |p: &Policy, slot: usize, action: &'static str, decision: &'static str| {
            match self.series.get(&(std::ptr::from_ref(p) as usize)) {
                Some(s) => s.0[slot].get_or_init(|| series(&p.label, action, decision)).inc(),
                None => series(&p.label, action, decision).inc(),
            };
        };
        match (v.why, v.by) {
            (Why::Denied, Some((p, _))) => inc(p, 0, "DENY", "deny"),
            (Why::Allowed, Some((p, _))) => inc(p, 0, "ALLOW", "allow"),
            (Why::NoAllowMatched, _) => {
                self.no_allow_match.get_or_init(|| series(&Arc::from(""), "ALLOW", "deny")).inc();
            }
            _ => {}
        }
        for (p, _) in &v.audited {
            inc(p, 1, "AUDIT", "audit");
        }
        for p in &v.dry_run {
            inc(p, 2, p.action.as_str(), "dry_run");
        }
    }
}

/// The header that tells a workload who called it, in Envoy's format.
pub const XFCC: hyper::header::HeaderName = hyper::header::HeaderName::from_static("x-forwarded-client-cert");

/// The `x-forwarded-client-cert` value for `caller` reaching the workload
/// `server` (when it is one): `By=<server>;URI=<caller>`.
pub fn client_cert_header(server: Option<&Identity>, caller: &Identity) -> Option<hyper::header::HeaderValue> {
    let v = match server {
        Some(s) => format!("By={s};URI={caller}"),
        None => format!("URI={caller}"),
    };
    hyper::header::HeaderValue::from_str(&v).ok()
}
