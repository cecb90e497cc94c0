//! `meshctl get routes` and `meshctl route check`: the routes of the
//! daemon's state, and where a request would go, decided by the same code
//! the proxy runs (`mesh_daemon::routing::decide`) on the daemon's
//! current document.

use anyhow::{anyhow, bail, Context};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Uri};
use serde_json::{json, Value};

use mesh_daemon::model::route::{PathMatch, RouteDoc, Router, Rule, ValueMatch};
use mesh_daemon::model::{Document, ServiceKey, State};
use mesh_daemon::routing::{decide, Decision, Head};

/// One row per route: name, kind, parents, rules (with their matches) and
/// backends with weights, and its status. Every route in an accepted
/// state was accepted (a state with a bad route is refused whole); one
/// whose backendRefs do not all resolve says which and why
/// (`ResolvedRefs=False`), as the daemon decides it.
pub fn list(doc: &Value) -> Vec<Value> {
    let routes: Vec<RouteDoc> = serde_json::from_value(doc["routes"].clone()).unwrap_or_default();
    let unresolved = serde_json::from_value::<Document>(doc.clone())
        .ok()
        .and_then(|d| State::from_document(&d).ok())
        .map(|s| s.routes.unresolved.clone())
        .unwrap_or_default();
    routes
        .iter()
        .enumerate()
        .map(|(at, r)| {
            let refs: Vec<String> = unresolved.iter().filter(|u| u.route == at).map(ToString::to_string).collect();
            let status = if refs.is_empty() {
                "Accepted, ResolvedRefs".to_owned()
            } else {
                format!("Accepted, ResolvedRefs=False: {}", refs.join("; "))
            };
            let parents: Vec<String> = r
                .spec
                .parent_refs
                .iter()
                .map(|p| {
                    let ns = p.namespace.as_deref().unwrap_or(&r.metadata.namespace);
                    p.port.map_or(format!("{ns}/{}", p.name), |port| format!("{ns}/{}:{port}", p.name))
                })
                .collect();
            let rules: Vec<Value> = r
                .spec
                .rules
                .iter()
                .enumerate()
                .map(|(i, rule)| {
                    let backends: Vec<String> = rule
                        .backend_refs
                        .iter()
                        .map(|b| format!("{}:{} w{}", b.name, b.port.unwrap_or(0), b.weight.unwrap_or(1)))
                        .collect();
                    json!({
                        "name": rule.name.clone().unwrap_or_else(|| i.to_string()),
                        "matches": rule.matches.len().max(1),
                        "filters": rule.filters.iter().map(|f| f.kind.clone()).collect::<Vec<_>>(),
                        "backends": backends,
                    })
                })
                .collect();
            json!({
                "name": format!("{}/{}", r.metadata.namespace, r.metadata.name),
                "kind": r.kind,
                "parents": parents,
                "rules": rules,
                "status": status,
            })
        })
        .collect()
}

/// What `meshctl route check` was asked.
pub struct Check<'a> {
    pub service: &'a str,
    pub url: &'a str,
    pub method: &'a str,
    pub headers: &'a [String],
    pub from: Option<&'a str>,
}

/// Where the request `c` describes goes in the state `doc`: the route,
/// rule and match that decide it and every backend with its share, or
/// the proxy's own answer.
pub fn check(doc: &Value, c: &Check<'_>) -> anyhow::Result<Value> {
    let (state, at) = super::state_with_service(doc, c.service)?;
    let svc = &state.services[at];
    let (ns, name) = (svc.namespace.as_str(), svc.name.as_str());
    let uri: Uri = c.url.parse().with_context(|| format!("{:?} is not a URL: write e.g. http://web/path", c.url))?;
    if uri.authority().is_none() {
        bail!("{:?} names no host: write e.g. http://web/path", c.url);
    }
    let port = match uri.port_u16() {
        Some(p) => p,
        None => {
            svc.ports.iter().map(|p| p.port.0).find(|p| *p == 80).or(svc.ports.first().map(|p| p.port.0)).unwrap_or(80)
        }
    };
    if !svc.ports.iter().any(|p| p.port.0 == port) {
        bail!("service {ns}/{name} has no port {port}: name one of its ports in the URL");
    }
    let method =
        Method::from_bytes(c.method.as_bytes()).map_err(|_| anyhow!("{:?} is not an HTTP method", c.method))?;
    let mut headers = HeaderMap::new();
    for h in c.headers {
        let (k, v) = h.split_once('=').ok_or_else(|| anyhow!("--header {h:?}: write NAME=VALUE"))?;
        let k = HeaderName::from_bytes(k.trim().as_bytes())
            .map_err(|_| anyhow!("--header {h:?}: {k:?} is not a header name"))?;
        let v = HeaderValue::from_str(v).map_err(|_| anyhow!("--header {h:?}: not a header value"))?;
        headers.append(k, v);
    }
    let key = ServiceKey { namespace: svc.namespace.clone(), name: svc.name.clone() };
    let Some(router) = state.routes.router(&key).filter(|r| r.takes(port)) else {
        return Ok(
            json!({ "decision": "service", "service": format!("{key}:{port}"), "why": "no route is attached to this service port: the service balances the request over its own endpoints" }),
        );
    };
    let head = Head { method: &method, uri: &uri, headers: &headers };
    let side = |r: &Router| match c.from {
        Some(f) if r.consumers.iter().any(|n| n.as_str() == f) => format!("the consumer routes of namespace {f}"),
        _ => format!("the producer routes of namespace {}", r.parent.namespace),
    };
    Ok(match decide(router, port, c.from, &head, 0.0) {
        Decision::Service => {
            json!({ "decision": "service", "service": format!("{key}:{port}"), "why": format!("{} has no route for this port: the service balances the request itself", side(router)) })
        }
        Decision::NotFound => json!({ "decision": "404", "why": format!("no rule of {} matches", side(router)) }),
        Decision::Redirect { entry, status, location } => {
            let rule = &router.rules[entry.rule];
            json!({ "decision": "redirect", "status": status, "location": location, "route": rule.route.to_string(), "rule": rule.name, "why": why(entry.at, &entry.matches, rule) })
        }
        Decision::Forward { entry, rule, .. } => {
            let total = rule.total_weight;
            let share = |w: u64| if total == 0 { 0.0 } else { w as f64 / total as f64 };
            let mut backends: Vec<Value> = rule
                .backends
                .iter()
                .map(|b| json!({ "backend": b.port.to_string(), "weight": b.weight, "share": share(u64::from(b.weight)) }))
                .collect();
            let listed: u64 = rule.backends.iter().map(|b| u64::from(b.weight)).sum();
            if total > listed {
                backends.push(json!({ "backend": "500 (backendRefs that do not resolve: see meshctl get routes)", "weight": total - listed, "share": share(total - listed) }));
            }
            let decision = if listed == 0 { "500" } else { "forward" };
            json!({ "decision": decision, "route": rule.route.to_string(), "rule": rule.name, "backends": backends, "why": why(entry.at, &entry.matches, rule) })
        }
    })
}

/// Which match of which rule won, as written.
fn why(at: (usize, usize), m: &mesh_daemon::model::route::Match, rule: &Rule) -> String {
    let path = match &m.path {
        PathMatch::Exact(p) => format!("path Exact {p}"),
        PathMatch::Prefix(p) => format!("path PathPrefix {p}"),
        PathMatch::Regex(r) => format!("path RegularExpression {}", r.as_str()),
    };
    let mut parts = vec![path];
    if let Some(method) = &m.method {
        parts.push(format!("method {method}"));
    }
    let v = |v: &ValueMatch| match v {
        ValueMatch::Exact(s) => s.clone(),
        ValueMatch::Regex(r) => format!("~{}", r.as_str()),
    };
    parts.extend(m.headers.iter().map(|(n, x)| format!("header {n}={}", v(x))));
    parts.extend(m.query.iter().map(|(n, x)| format!("query {n}={}", v(x))));
    format!(
        "route {} spec.rules[{}].matches[{}] ({}) is the first match in precedence order",
        rule.route,
        at.0,
        at.1,
        parts.join(", ")
    )
}
