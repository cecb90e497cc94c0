//! Policy documents checked and compiled: every bad field reported with
//! its path (`policies[0].spec.rules[1].from[0].source.principals[2]`) and
//! what would fix it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use hyper::header::HeaderName;

use super::doc::{ConditionDoc, OperationDoc, PolicyDoc, RuleDoc, SourceDoc};
use super::{Action, Cidr, Condition, ConditionKey, Operation, Pattern, Policies, Policy, Rule, Scope, Source};
use super::{DRY_RUN, ROOT_NAMESPACE};
use crate::model::errors::{invalid, Errors, Invalid};
use crate::model::{Chunked, Mode, Name, Service, ServiceKey, Workload};

const API_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];
/// Entries of one list (principals, paths, ...) at most: a policy is
/// checked per request.
const MAX_LIST: usize = 256;

/// `docs` compiled against the state's `services` and `workloads` (a
/// policy may not select a kernel-mode service's workloads: the kernel
/// balances those connections, and no proxy sees them to decide). Errors
/// go to `e` under `policies[i]`.
pub(in crate::model) fn compile(
    e: &mut Errors,
    docs: &[Arc<PolicyDoc>],
    services: &Chunked<Arc<Service>>,
    workloads: &[Workload],
) -> Policies {
    let labels: BTreeMap<std::net::IpAddr, &BTreeMap<String, String>> =
        workloads.iter().flat_map(|w| w.ips.iter().map(move |ip| (ip, &w.labels))).collect();
    let mut list = Vec::new();
    let mut seen = std::collections::HashMap::new();
    for (i, d) in docs.iter().enumerate() {
        let p = format!("policies[{i}]");
        if !e.first_named(&mut seen, ("policies", "policy"), i, (&d.metadata.namespace, &d.metadata.name)) {
            continue;
        }
        if let Some(policy) = policy(e, &p, d) {
            if let Some(why) = kernel_selected(&policy, services, &labels) {
                e.push(format!("{p}.spec"), why);
                continue;
            }
            list.push(Arc::new(policy));
        }
    }
    // Each service's `authorization` is an ALLOW policy of its own.
    let from_services: Vec<(ServiceKey, crate::model::Authorization)> =
        services.iter().filter_map(|s| Some((s.key(), s.authorization.clone()?))).collect();
    list.extend(from_services.iter().map(|(k, a)| Arc::new(super::from_service(k, a))));
    Policies::new(docs.to_vec(), from_services, list)
}

/// Why `policy` may not be: it applies to a workload behind a kernel-mode
/// service.
fn kernel_selected(
    policy: &Policy,
    services: &Chunked<Arc<Service>>,
    labels: &BTreeMap<std::net::IpAddr, &BTreeMap<String, String>>,
) -> Option<String> {
    let no_labels = BTreeMap::new();
    for s in services.iter().filter(|s| s.mode == Mode::Kernel) {
        let key = s.key();
        let hit = s.endpoints.iter().any(|ep| {
            let dest = super::Dest {
                service: &key,
                namespace: s.namespace.as_str(),
                labels: Some(labels.get(&ep.ip).copied().unwrap_or(&no_labels)),
                port: 0,
            };
            policy.applies(&dest)
        }) || matches!(&policy.scope, Scope::Services(k) if k.contains(&key));
        if hit {
            return Some(format!(
                "applies to service {key}, which is in kernel mode: the kernel balances its connections and no proxy sees them to decide; set mode: proxy on it, or narrow the policy (targetRefs, selector)"
            ));
        }
    }
    None
}

pub(super) fn policy(e: &mut Errors, p: &str, d: &PolicyDoc) -> Option<Policy> {
    let before = e.0.len();
    if !API_VERSIONS.contains(&d.api_version.as_str()) {
        e.push(
            format!("{p}.apiVersion"),
            format!("{:?} is not served here: write {:?}", d.api_version, API_VERSIONS[0]),
        );
    }
    if d.kind != "AuthorizationPolicy" {
        e.push(format!("{p}.kind"), format!("{:?}: write \"AuthorizationPolicy\"", d.kind));
    }
    let namespace = e.take(|| format!("{p}.metadata.namespace"), Name::parse(&d.metadata.namespace));
    let name = e.take(|| format!("{p}.metadata.name"), Name::parse(&d.metadata.name));
    let dry_run = match d.metadata.annotations.get(DRY_RUN).map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(v) => {
            e.push(format!("{p}.metadata.annotations[{DRY_RUN}]"), format!("{v:?}: write \"true\" or \"false\""));
            false
        }
    };
    let sp = format!("{p}.spec");
    let action = match d.spec.action.as_deref().unwrap_or("ALLOW") {
        "ALLOW" => Some(Action::Allow),
        "DENY" => Some(Action::Deny),
        "AUDIT" => Some(Action::Audit),
        "CUSTOM" => {
            e.push(
                format!("{sp}.action"),
                "CUSTOM (an external authorizer) is not implemented: use ALLOW, DENY or AUDIT",
            );
            None
        }
        a => {
            e.push(format!("{sp}.action"), format!("{a:?}: write ALLOW, DENY or AUDIT"));
            None
        }
    };
    let namespace = namespace?;
    // The root namespace's policies apply to every namespace.
    let ns = (namespace.as_str() != ROOT_NAMESPACE).then(|| namespace.clone());
    let scope = match (&d.spec.selector, d.spec.target_refs.is_empty()) {
        (Some(_), false) => {
            e.push(sp.clone(), "selector and targetRefs together: keep one");
            None
        }
        (Some(s), true) => {
            for (k, v) in &s.match_labels {
                if !label_ok(k) || !(v.is_empty() || label_ok(v)) || v.len() > 63 {
                    e.push(
                        format!("{sp}.selector.matchLabels[{k}]"),
                        format!("{k:?}: {v:?} is not a label: letters, digits, '-', '_', '.', '/'"),
                    );
                }
            }
            Some(Scope::Selector(ns, s.match_labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect()))
        }
        (None, false) => {
            let mut keys = Vec::new();
            for (j, t) in d.spec.target_refs.iter().enumerate() {
                let tp = format!("{sp}.targetRefs[{j}]");
                if t.group.as_deref().is_some_and(|g| !g.is_empty()) || t.kind != "Service" {
                    e.push(tp.clone(), format!("{}/{} is not a Service: the mesh's policies target Services (group \"\", kind Service), or workloads by selector", t.group.as_deref().unwrap_or(""), t.kind));
                    continue;
                }
                if t.namespace.as_deref().is_some_and(|n| n != namespace.as_str()) {
                    e.push(
                        format!("{tp}.namespace"),
                        "a policy targets Services of its own namespace: move the policy there",
                    );
                    continue;
                }
                if let Some(name) = e.take(|| format!("{tp}.name"), Name::parse(&t.name)) {
                    keys.push(ServiceKey { namespace: namespace.clone(), name });
                }
            }
            Some(Scope::Services(keys))
        }
        (None, true) => Some(Scope::Namespace(ns)),
    };
    if d.spec.rules.len() > MAX_LIST {
        e.push(format!("{sp}.rules"), format!("{} rules are over {MAX_LIST}: split the policy", d.spec.rules.len()));
    }
    let rules: Vec<Rule> =
        d.spec.rules.iter().enumerate().map(|(j, r)| rule(e, &format!("{sp}.rules[{j}]"), r)).collect();
    if e.0.len() != before {
        return None;
    }
    Some(Policy::new(format!("{namespace}/{}", name?).into(), action?, dry_run, scope?, rules))
}

fn label_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
}

fn rule(e: &mut Errors, p: &str, d: &RuleDoc) -> Rule {
    Rule {
        from: d.from.iter().enumerate().map(|(i, f)| source(e, &format!("{p}.from[{i}].source"), &f.source)).collect(),
        to: d
            .to
            .iter()
            .enumerate()
            .map(|(i, t)| operation(e, &format!("{p}.to[{i}].operation"), &t.operation))
            .collect(),
        when: d.when.iter().enumerate().filter_map(|(i, c)| condition(e, &format!("{p}.when[{i}]"), c)).collect(),
    }
}

/// A list of patterns, each checked by `check` too.
fn patterns(e: &mut Errors, p: &str, list: &[String], check: &dyn Fn(&str) -> Result<(), Invalid>) -> Vec<Pattern> {
    if list.len() > MAX_LIST {
        e.push(p.to_owned(), format!("{} entries are over {MAX_LIST}", list.len()));
    }
    list.iter()
        .enumerate()
        .filter_map(|(i, s)| e.take(|| format!("{p}[{i}]"), pattern(s).and_then(|pat| check(s).map(|_| pat))))
        .collect()
}

/// `*`, `prefix*`, `*suffix` or an exact string: a `*` anywhere else is
/// refused.
fn pattern(s: &str) -> Result<Pattern, Invalid> {
    if s.is_empty() {
        return Err(invalid!("is empty: write a value, or * for any"));
    }
    if s == "*" {
        return Ok(Pattern::Any);
    }
    let inner = |t: &str| !t.contains('*');
    match (s.strip_prefix('*'), s.strip_suffix('*')) {
        (Some(rest), None) if inner(rest) => Ok(Pattern::Suffix(rest.to_owned())),
        (None, Some(rest)) if inner(rest) => Ok(Pattern::Prefix(rest.to_owned())),
        (None, None) if inner(s) => Ok(Pattern::Exact(s.to_owned())),
        _ => Err(invalid!("{s:?}: a * may only begin or end a pattern (prefix*, *suffix, or * alone)")),
    }
}

/// A principal as Istio writes it: `<trust domain>/ns/<namespace>/sa/<account>`.
fn principal(s: &str) -> Result<(), Invalid> {
    if s.starts_with("spiffe://") {
        return Err(invalid!("{s:?}: write principals without spiffe:// (cluster.local/ns/NAMESPACE/sa/ACCOUNT)"));
    }
    if s.contains('*') {
        return Ok(());
    }
    let parts: Vec<&str> = s.split('/').collect();
    match parts.as_slice() {
        [td, "ns", ns, "sa", sa] if !td.is_empty() && Name::parse(ns).is_ok() && Name::parse(sa).is_ok() => Ok(()),
        _ => Err(invalid!(
            "{s:?} is not a principal: write TRUST_DOMAIN/ns/NAMESPACE/sa/ACCOUNT, e.g. cluster.local/ns/shop/sa/web"
        )),
    }
}

fn any(_: &str) -> Result<(), Invalid> {
    Ok(())
}

fn source(e: &mut Errors, p: &str, d: &SourceDoc) -> Source {
    let blocks = |e: &mut Errors, field: &str, list: &[String]| -> Vec<Cidr> {
        list.iter().enumerate().filter_map(|(i, s)| e.take(|| format!("{p}.{field}[{i}]"), cidr(s))).collect()
    };
    Source {
        principals: patterns(e, &format!("{p}.principals"), &d.principals, &principal),
        not_principals: patterns(e, &format!("{p}.notPrincipals"), &d.not_principals, &principal),
        namespaces: patterns(e, &format!("{p}.namespaces"), &d.namespaces, &any),
        not_namespaces: patterns(e, &format!("{p}.notNamespaces"), &d.not_namespaces, &any),
        ip_blocks: blocks(e, "ipBlocks", &d.ip_blocks),
        not_ip_blocks: blocks(e, "notIpBlocks", &d.not_ip_blocks),
    }
}

fn cidr(s: &str) -> Result<Cidr, Invalid> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let addr: IpAddr =
        addr.parse().map_err(|_| invalid!("{s:?} is not an address or CIDR block (10.0.0.0/8, fd00::/8)"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(l) => l
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| invalid!("{s:?}: the prefix length is not 0..{max}"))?,
    };
    Ok(Cidr { addr, len })
}

fn path(s: &str) -> Result<(), Invalid> {
    if s.starts_with('/') || s.starts_with('*') {
        Ok(())
    } else {
        Err(invalid!("{s:?}: a path starts with / (or is *suffix)"))
    }
}

fn operation(e: &mut Errors, p: &str, d: &OperationDoc) -> Operation {
    let ports = |e: &mut Errors, field: &str, list: &[String]| -> Vec<u16> {
        list.iter()
            .enumerate()
            .filter_map(|(i, s)| {
                e.take(
                    || format!("{p}.{field}[{i}]"),
                    s.parse::<u16>().ok().filter(|n| *n > 0).ok_or_else(|| invalid!("{s:?} is not a port (1..65535)")),
                )
            })
            .collect()
    };
    let method = |s: &str| -> Result<(), Invalid> {
        if s.contains('*') || hyper::Method::from_bytes(s.as_bytes()).is_ok() {
            Ok(())
        } else {
            Err(invalid!("{s:?} is not an HTTP method"))
        }
    };
    Operation {
        hosts: patterns(e, &format!("{p}.hosts"), &lower(&d.hosts), &any),
        not_hosts: patterns(e, &format!("{p}.notHosts"), &lower(&d.not_hosts), &any),
        ports: ports(e, "ports", &d.ports),
        not_ports: ports(e, "notPorts", &d.not_ports),
        methods: patterns(e, &format!("{p}.methods"), &d.methods, &method),
        not_methods: patterns(e, &format!("{p}.notMethods"), &d.not_methods, &method),
        paths: patterns(e, &format!("{p}.paths"), &d.paths, &path),
        not_paths: patterns(e, &format!("{p}.notPaths"), &d.not_paths, &path),
    }
}

/// Hosts match case-insensitively.
fn lower(list: &[String]) -> Vec<String> {
    list.iter().map(|h| h.to_ascii_lowercase()).collect()
}

fn condition(e: &mut Errors, p: &str, d: &ConditionDoc) -> Option<Condition> {
    let key = if d.key == "source.principal" {
        Some(ConditionKey::Principal)
    } else if let Some(name) = d.key.strip_prefix("request.headers[").and_then(|r| r.strip_suffix(']')) {
        e.take(
            || format!("{p}.key"),
            HeaderName::from_bytes(name.as_bytes())
                .map(ConditionKey::Header)
                .map_err(|_| invalid!("{name:?} is not a header name")),
        )
    } else {
        e.push(
            format!("{p}.key"),
            format!("{:?} is not implemented: use request.headers[NAME] or source.principal", d.key),
        );
        None
    };
    if d.values.is_empty() && d.not_values.is_empty() {
        e.push(p.to_owned(), "needs values or notValues");
    }
    let check: &dyn Fn(&str) -> Result<(), Invalid> =
        if matches!(key, Some(ConditionKey::Principal)) { &principal } else { &any };
    let values = patterns(e, &format!("{p}.values"), &d.values, check);
    let not_values = patterns(e, &format!("{p}.notValues"), &d.not_values, check);
    Some(Condition { key: key?, values, not_values })
}
