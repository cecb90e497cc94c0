//! `meshctl get policies` and `meshctl authz check`: the authorization
//! policies of the daemon's state, and what they decide for a caller,
//! by the same evaluation the proxy runs
//! (`mesh_daemon::authorization::Guard`) on the daemon's current document.

use anyhow::{anyhow, bail};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{json, Value};

use mesh_daemon::authorization::Guard;
use mesh_daemon::model::authz::{PolicyDoc, Request, Scope, Why};
use mesh_daemon::model::{Document, Identity, State};

/// One row per policy: name, action, what it applies to, its rules, and
/// whether it is a dry run.
pub fn list(doc: &Value) -> Vec<Value> {
    let docs: Vec<PolicyDoc> = serde_json::from_value(doc["policies"].clone()).unwrap_or_default();
    let state = serde_json::from_value::<Document>(doc.clone()).ok().and_then(|d| State::from_document(&d).ok());
    // The services' `authorization`, each an ALLOW policy of its own.
    let from_services: Vec<Value> = state
        .as_ref()
        .map(|s| {
            s.policies
                .list
                .iter()
                .filter(|p| p.label.ends_with(".authorization"))
                .map(|p| {
                    let scope = match &p.scope {
                        Scope::Services(keys) => keys.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
                        _ => "-".into(),
                    };
                    json!({ "name": p.label.to_string(), "action": "ALLOW", "appliesTo": scope, "rules": p.rules.len(), "dryRun": false })
                })
                .collect()
        })
        .unwrap_or_default();
    docs.iter()
        .map(|d| {
            let label = format!("{}/{}", d.metadata.namespace, d.metadata.name);
            let compiled = state.as_ref().and_then(|s| s.policies.list.iter().find(|p| *p.label == *label).cloned());
            let scope = match compiled.as_ref().map(|p| &p.scope) {
                Some(Scope::Namespace(None)) => "every namespace".to_owned(),
                Some(Scope::Namespace(Some(ns))) => format!("namespace {ns}"),
                Some(Scope::Services(keys)) => keys.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
                Some(Scope::Selector(ns, labels)) => {
                    let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    format!(
                        "{} in {}",
                        l.join(","),
                        ns.as_ref().map_or("every namespace".into(), |n| format!("namespace {n}"))
                    )
                }
                None => "-".into(),
            };
            json!({
                "name": label,
                "action": d.spec.action.clone().unwrap_or_else(|| "ALLOW".into()),
                "appliesTo": scope,
                "rules": d.spec.rules.len(),
                "dryRun": compiled.as_ref().is_some_and(|p| p.dry_run),
            })
        })
        .chain(from_services)
        .collect()
}

/// What `meshctl authz check` was asked.
pub struct Check<'a> {
    pub service: &'a str,
    pub from: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub port: Option<u16>,
    pub headers: &'a [String],
    pub ip: Option<&'a str>,
}

/// What the policies of the state `doc` decide for the caller and request
/// `c` at each endpoint of the service (the same for all, unless a
/// selector tells their workloads apart).
pub fn check(doc: &Value, c: &Check<'_>) -> anyhow::Result<Value> {
    let (state, at) = super::state_with_service(doc, c.service)?;
    let svc = &state.services[at];
    let (ns, name) = (svc.namespace.as_str(), svc.name.as_str());
    let id = Identity::parse(c.from)
        .map_err(|e| anyhow!("--from {:?}: {e}; write e.g. spiffe://cluster.local/ns/shop/sa/web", c.from))?;
    let sp = match c.port {
        Some(p) => {
            svc.ports.iter().find(|sp| sp.port.0 == p).ok_or_else(|| anyhow!("service {ns}/{name} has no port {p}"))?
        }
        None => svc.ports.first().ok_or_else(|| anyhow!("service {ns}/{name} has no port"))?,
    };
    let ip = c.ip.map(|i| i.parse().map_err(|_| anyhow!("--ip {i:?} is not an address"))).transpose()?;
    let guard = Guard::build(&state, id.trust_domain());
    let who = guard.caller(Some(&id), ip);
    let mut headers = HeaderMap::new();
    for h in c.headers {
        let (k, v) = h.split_once('=').ok_or_else(|| anyhow!("--header {h:?}: write NAME=VALUE"))?;
        let k =
            HeaderName::from_bytes(k.trim().as_bytes()).map_err(|_| anyhow!("--header {h:?}: not a header name"))?;
        headers.append(k, HeaderValue::from_str(v).map_err(|_| anyhow!("--header {h:?}: not a header value"))?);
    }
    let host = format!("{}.{}", svc.name, svc.namespace);
    let req = Request { method: c.method, path: c.path, host: &host, headers: &headers };
    let req = sp.app_protocol.is_requests().then_some(&req);
    if svc.endpoints.is_empty() {
        bail!("service {ns}/{name} has no endpoint to decide for");
    }
    let key = svc.key();
    let rows: Vec<Value> = svc
        .endpoints
        .iter()
        .map(|ep| {
            let target = std::net::SocketAddr::new(ep.ip, sp.target_port.0);
            let v = guard.verdict(&key, target, &who, req);
            let why = match v.why {
                Why::Denied => "a DENY policy matched",
                Why::Allowed => "an ALLOW policy matched",
                Why::NoAllowMatched => "ALLOW policies apply and none matched",
                Why::NoPolicy => "no ALLOW or DENY policy applies",
            };
            json!({
                "endpoint": target.to_string(),
                "decision": if v.allowed { "allow" } else { "deny" },
                "policy": v.by.map(|(p, _)| p.label.to_string()),
                "rule": v.by.map(|(_, r)| r),
                "why": why,
                "audited": v.audited.iter().map(|(p, r)| format!("{}#{r}", p.label)).collect::<Vec<_>>(),
                "dryRun": v.dry_run.iter().map(|p| p.label.to_string()).collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(json!({ "service": key.to_string(), "port": sp.port.0, "request": req.is_some(), "endpoints": rows }))
}
