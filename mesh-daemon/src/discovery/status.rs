//! Route status in the cluster: one component per cluster (the issuer,
//! `ca serve --kubernetes`), never the node daemons, writes each
//! HTTPRoute's and GRPCRoute's `status.parents[]` for the mesh, with the
//! Gateway API's `Accepted` and `ResolvedRefs` conditions and reasons. It
//! writes only what differs from what the route already says, so a second
//! issuer replica, or a restart, writes nothing new; other controllers'
//! entries are kept.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::Client;
use serde_json::{json, Value};
use tokio::sync::Notify;
use tracing::{info, warn};

use super::routes::{resource, KINDS};
use super::translate::app_protocol;
use crate::model::route::{check, ReferenceGrantDoc, ServiceShape};
use crate::model::{Name, ServiceKey};

/// The `controllerName` of the mesh's status entries.
pub const CONTROLLER: &str = "mesh.io/mesh";

/// The Services a route may name: `(namespace, name)` -> the Service.
pub type Services<'a> = HashMap<(&'a str, &'a str), &'a Service>;

/// One condition, as the spec writes it (without its transition time).
fn condition(kind: &str, ok: bool, reason: &str, message: &str, generation: Option<i64>) -> Value {
    json!({
        "type": kind,
        "status": if ok { "True" } else { "False" },
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
    })
}

/// The mesh's `status.parents[]` entries of route `o` (of `kind`), one
/// per Service parentRef, with the cluster's `grants`. The route is
/// checked by the model's own code (`model::route::check`), as a node
/// daemon compiles it: what it refuses is `Accepted=False`, the refs it
/// cannot resolve `ResolvedRefs=False`.
pub fn desired(
    kind: &str,
    o: &DynamicObject,
    services: &Services<'_>,
    grants: &[Arc<ReferenceGrantDoc>],
) -> Vec<Value> {
    let ns = o.metadata.namespace.as_deref().unwrap_or("default");
    let generation = o.metadata.generation;
    let doc = super::routes::doc(kind, o);
    let parent_refs: Vec<Value> = o.data["spec"]["parentRefs"].as_array().cloned().unwrap_or_default();
    let is_service = |r: &Value| {
        r["group"].as_str().unwrap_or("").is_empty() && r["kind"].as_str().unwrap_or("Service") == "Service"
    };
    let find = |ns: &str, name: &str| shape(services.get(&(ns, name))?);
    let checked = doc.as_ref().ok().map(|d| check(&Arc::new(d.clone()), grants, &find));
    // The model's errors, by the parentRef they are of (None: the route's).
    let errors = |j: Option<usize>| -> Vec<String> {
        let Some((errors, _)) = &checked else { return Vec::new() };
        errors
            .0
            .iter()
            .filter(|e| {
                let of = e.path.strip_prefix("routes[0].spec.parentRefs[").and_then(|r| r.split_once(']'));
                of.and_then(|(i, _)| i.parse::<usize>().ok()) == j
            })
            .map(|e| e.to_string().replacen("routes[0].", "", 1))
            .collect()
    };
    let refs = match (&doc, &checked) {
        (Err(_), _) | (_, None) => {
            condition("ResolvedRefs", false, "UnsupportedValue", "the route does not parse", generation)
        }
        (Ok(_), Some((_, unresolved))) => match unresolved.first() {
            None => condition("ResolvedRefs", true, "ResolvedRefs", "every backendRef resolves", generation),
            Some(u) => {
                let all: Vec<String> = unresolved.iter().map(|u| u.to_string().replacen("routes[0].", "", 1)).collect();
                condition("ResolvedRefs", false, u.reason.as_str(), &all.join("; "), generation)
            }
        },
    };
    let route_errors = errors(None);
    parent_refs
        .iter()
        .enumerate()
        .filter(|(_, r)| is_service(r))
        .map(|(j, r)| {
            let pns = r["namespace"].as_str().unwrap_or(ns);
            let name = r["name"].as_str().unwrap_or("");
            let not = |reason: &str, m: &str| condition("Accepted", false, reason, m, generation);
            let accepted = match (&doc, services.get(&(pns, name))) {
                (Err(e), _) => not("UnsupportedValue", &e.to_string()),
                (_, None) => not("NoMatchingParent", &format!("no Service {pns}/{name}")),
                (_, Some(s)) if kernel_mode(s) => not(
                    "UnsupportedValue",
                    &format!(
                        "Service {pns}/{name} is balanced in the kernel (mesh.io/mode: kernel), which sees no request"
                    ),
                ),
                (_, Some(s)) if r["port"].as_i64().is_some_and(|p| !has_port(s, p)) => {
                    not("NoMatchingParent", &format!("Service {pns}/{name} has no port {}", r["port"]))
                }
                _ if !route_errors.is_empty() => not("UnsupportedValue", &route_errors.join("; ")),
                _ => match errors(Some(j)) {
                    e if e.is_empty() => condition("Accepted", true, "Accepted", "routed by the mesh", generation),
                    e => not("UnsupportedValue", &e.join("; ")),
                },
            };
            json!({ "parentRef": r, "controllerName": CONTROLLER, "conditions": [accepted, refs.clone()] })
        })
        .collect()
}

/// What routing needs of a cluster's Service, as the daemon's state has
/// it: its ports carry requests by their `appProtocol` (or name), unless
/// the kernel balances it.
fn shape(s: &Service) -> Option<ServiceShape> {
    let key = ServiceKey {
        namespace: Name::parse(s.metadata.namespace.as_deref().unwrap_or("default")).ok()?,
        name: Name::parse(s.metadata.name.as_deref()?).ok()?,
    };
    let kernel = kernel_mode(s);
    let ports = s
        .spec
        .as_ref()
        .and_then(|sp| sp.ports.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let requests = !kernel && app_protocol(p.app_protocol.as_deref(), p.name.as_deref()).is_some();
            Some((u16::try_from(p.port).ok()?, requests))
        })
        .collect();
    Some(ServiceShape { key, kernel, ports })
}

fn kernel_mode(s: &Service) -> bool {
    s.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(super::translate::MODE_ANNOTATION))
        .is_some_and(|m| m == "kernel")
}

fn has_port(s: &Service, port: i64) -> bool {
    s.spec.as_ref().and_then(|sp| sp.ports.as_ref()).is_some_and(|ps| ps.iter().any(|p| i64::from(p.port) == port))
}

/// The route's `status.parents` with the mesh's entries replaced by
/// `ours` (transition times kept where a condition's status did not
/// change, else `now`); None when that is what it says already.
pub fn merged(current: &Value, ours: Vec<Value>, now: &str) -> Option<Vec<Value>> {
    let parents: Vec<Value> = current["parents"].as_array().cloned().unwrap_or_default();
    let (mine, mut others): (Vec<Value>, Vec<Value>) =
        parents.into_iter().partition(|p| p["controllerName"] == CONTROLLER);
    let strip = |v: &Value| {
        let mut v = v.clone();
        for c in v["conditions"].as_array_mut().into_iter().flatten() {
            c.as_object_mut().map(|o| o.remove("lastTransitionTime"));
        }
        v
    };
    if mine.iter().map(strip).collect::<Vec<_>>() == ours {
        return None;
    }
    let before = |parent: &Value, kind: &Value| -> Option<Value> {
        let p = mine.iter().find(|m| m["parentRef"] == *parent)?;
        p["conditions"].as_array()?.iter().find(|c| c["type"] == *kind).cloned()
    };
    for mut p in ours {
        let parent = p["parentRef"].clone();
        for c in p["conditions"].as_array_mut().into_iter().flatten() {
            let same = before(&parent, &c["type"]).filter(|b| b["status"] == c["status"]);
            c["lastTransitionTime"] = same.map_or_else(|| json!(now), |b| b["lastTransitionTime"].clone());
        }
        others.push(p);
    }
    Some(others)
}

/// Writes route status until the process ends: after every change of the
/// routes or Services (settled for a moment), each route whose mesh
/// entries differ gets one merge patch of `status.parents`.
pub async fn run(client: Client) {
    let changed = Arc::new(Notify::new());
    let mut tasks = Vec::new();
    let mut kinds: Vec<(&'static str, ApiResource, kube::runtime::reflector::Store<DynamicObject>)> = Vec::new();
    for (kind, plural) in KINDS {
        let ar = resource(kind, plural);
        if super::watch::served(&client, &ar).await {
            let store = super::watch::reflect_dynamic(&client, &ar, changed.clone(), &mut tasks);
            kinds.push((kind, ar, store));
        }
    }
    if kinds.is_empty() {
        info!("no Gateway API route kinds are served: no route status to write");
        return;
    }
    let grant = super::routes::grant_resource();
    let grants = match super::watch::served(&client, &grant).await {
        true => Some(super::watch::reflect_dynamic(&client, &grant, changed.clone(), &mut tasks)),
        false => None,
    };
    let services = super::watch::reflect::<Service>(&client, changed.clone(), &mut tasks);
    info!(controller = CONTROLLER, "writing the mesh's route status");
    loop {
        changed.notified().await;
        tokio::time::sleep(super::watch::DEBOUNCE).await;
        let svcs = services.state();
        let by_name: Services<'_> = svcs
            .iter()
            .filter_map(|s| Some(((s.metadata.namespace.as_deref()?, s.metadata.name.as_deref()?), s.as_ref())))
            .collect();
        let grants = super::routes::grants(&grants.as_ref().map(|g| g.state()).unwrap_or_default(), &mut Vec::new());
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
        let now = serde_json::to_value(&now).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
        for (kind, ar, store) in &kinds {
            for o in store.state() {
                let Some(parents) = merged(&o.data["status"], desired(kind, &o, &by_name, &grants), &now) else {
                    continue;
                };
                let (Some(ns), Some(name)) = (o.metadata.namespace.as_deref(), o.metadata.name.as_deref()) else {
                    continue;
                };
                let api = Api::<DynamicObject>::namespaced_with(client.clone(), ns, ar);
                let patch = json!({ "status": { "parents": parents } });
                match api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                    Ok(_) => info!(route = %format!("{kind} {ns}/{name}"), "route status written"),
                    Err(e) => {
                        warn!(route = %format!("{kind} {ns}/{name}"), error = %e, "writing route status failed; tried again at the next change")
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(ns: &str, name: &str, port: i32, kernel: bool) -> Service {
        let mut s = json!({ "metadata": { "name": name, "namespace": ns }, "spec": { "ports": [{ "port": port, "appProtocol": "http" }] } });
        if kernel {
            s["metadata"]["annotations"] = json!({ "mesh.io/mode": "kernel" });
        }
        serde_json::from_value(s).unwrap()
    }

    fn route(parents: Value, backends: Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": { "name": "r", "namespace": "shop", "generation": 3 },
            "spec": { "parentRefs": parents, "rules": [{ "backendRefs": backends }] },
        }))
        .unwrap()
    }

    fn conditions(v: &[Value]) -> Vec<(String, String, String)> {
        v.iter()
            .flat_map(|p| p["conditions"].as_array().unwrap().clone())
            .map(|c| {
                (
                    c["type"].as_str().unwrap().into(),
                    c["status"].as_str().unwrap().into(),
                    c["reason"].as_str().unwrap().into(),
                )
            })
            .collect()
    }

    #[test]
    fn accepted_and_resolved_refs_with_the_specs_reasons() {
        // shop/plain: a port without appProtocol (tcp).
        let mut plain = service("shop", "plain", 80, false);
        plain.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].app_protocol = None;
        let svcs = [
            service("shop", "web", 80, false),
            service("shop", "v2", 8080, false),
            service("shop", "k", 80, true),
            plain,
        ];
        let by: Services<'_> = svcs
            .iter()
            .map(|s| ((s.metadata.namespace.as_deref().unwrap(), s.metadata.name.as_deref().unwrap()), s))
            .collect();
        let c =
            |parents: Value, backends: Value| conditions(&desired("HTTPRoute", &route(parents, backends), &by, &[]));
        let t = |a: &str, b: &str, c: &str| (a.to_owned(), b.to_owned(), c.to_owned());
        let ok = json!([{ "name": "v2", "port": 8080 }]);
        assert_eq!(
            c(json!([{ "name": "web", "port": 80 }]), ok.clone()),
            [t("Accepted", "True", "Accepted"), t("ResolvedRefs", "True", "ResolvedRefs")]
        );
        assert_eq!(c(json!([{ "name": "nope" }]), ok.clone())[0], t("Accepted", "False", "NoMatchingParent"));
        assert_eq!(
            c(json!([{ "name": "web", "port": 81 }]), ok.clone())[0],
            t("Accepted", "False", "NoMatchingParent")
        );
        assert_eq!(c(json!([{ "name": "k" }]), ok)[0], t("Accepted", "False", "UnsupportedValue"));
        let refs = |b: Value| c(json!([{ "name": "web" }]), b)[1].clone();
        assert_eq!(refs(json!([{ "name": "gone", "port": 80 }])), t("ResolvedRefs", "False", "BackendNotFound"));
        assert_eq!(refs(json!([{ "name": "v2", "port": 80 }])), t("ResolvedRefs", "False", "BackendNotFound"));
        assert_eq!(
            refs(json!([{ "name": "v2", "namespace": "x", "port": 8080 }])),
            t("ResolvedRefs", "False", "RefNotPermitted")
        );
        assert_eq!(
            refs(json!([{ "name": "v2", "kind": "Pod", "port": 8080 }])),
            t("ResolvedRefs", "False", "InvalidKind")
        );
        let gw = desired(
            "HTTPRoute",
            &route(json!([{ "name": "gw", "kind": "Gateway", "group": "gateway.networking.k8s.io" }]), json!([])),
            &by,
            &[],
        );
        assert!(gw.is_empty(), "a Gateway parent is another controller's");
        // What the model refuses is not accepted, with the field and why:
        // a regular expression that does not compile, a parent port that
        // carries tcp.
        let bad = |spec: Value| {
            let o: DynamicObject = serde_json::from_value(json!({
                "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                "metadata": { "name": "r", "namespace": "shop", "generation": 3 }, "spec": spec,
            }))
            .unwrap();
            desired("HTTPRoute", &o, &by, &[])
        };
        let regex = bad(json!({ "parentRefs": [{ "name": "web" }], "rules": [{
            "matches": [{ "path": { "type": "RegularExpression", "value": "([" } }],
            "backendRefs": [{ "name": "v2", "port": 8080 }] }] }));
        assert_eq!(conditions(&regex)[0], t("Accepted", "False", "UnsupportedValue"));
        let m = regex[0]["conditions"][0]["message"].as_str().unwrap();
        assert!(m.starts_with("spec.rules[0].matches[0].path.value: \"([\" is not a regular expression"), "{m}");
        let mixed = bad(
            json!({ "parentRefs": [{ "name": "gw", "kind": "Gateway", "group": "gateway.networking.k8s.io" }, { "name": "web", "port": 80 }],
            "rules": [{ "backendRefs": [{ "name": "v2", "port": 8080 }] }] }),
        );
        let tcp = bad(
            json!({ "parentRefs": [{ "name": "plain", "port": 80 }], "rules": [{ "backendRefs": [{ "name": "v2", "port": 8080 }] }] }),
        );
        assert_eq!(conditions(&tcp)[0], t("Accepted", "False", "UnsupportedValue"));
        let m = tcp[0]["conditions"][0]["message"].as_str().unwrap();
        assert!(m.starts_with("spec.parentRefs[0].port: port 80 of service shop/plain carries tcp"), "{m}");
        assert_eq!(
            conditions(&mixed),
            [t("Accepted", "True", "Accepted"), t("ResolvedRefs", "True", "ResolvedRefs")],
            "the Service parent of a route shared with a Gateway"
        );
        // A ReferenceGrant in namespace x for the HTTPRoutes of shop.
        let grant: ReferenceGrantDoc = serde_json::from_value(json!({
            "apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
            "metadata": { "name": "g", "namespace": "x" },
            "spec": { "from": [{ "group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": "shop" }],
                      "to": [{ "group": "", "kind": "Service" }] },
        }))
        .unwrap();
        let far = [service("x", "v2", 8080, false)];
        let mut by = by;
        by.insert(("x", "v2"), &far[0]);
        let r = route(json!([{ "name": "web" }]), json!([{ "name": "v2", "namespace": "x", "port": 8080 }]));
        assert_eq!(
            conditions(&desired("HTTPRoute", &r, &by, &[Arc::new(grant.clone())]))[1],
            t("ResolvedRefs", "True", "ResolvedRefs")
        );
        assert_eq!(
            conditions(&desired("GRPCRoute", &r, &by, &[Arc::new(grant)]))[1],
            t("ResolvedRefs", "False", "RefNotPermitted"),
            "granted to HTTPRoutes only"
        );
    }

    #[test]
    fn only_a_change_is_written_and_other_controllers_entries_stay() {
        let svcs = [service("shop", "web", 80, false)];
        let by: Services<'_> = svcs.iter().map(|s| (("shop", "web"), s)).collect();
        let r = route(json!([{ "name": "web" }]), json!([{ "name": "web", "port": 80 }]));
        let other = json!({ "parentRef": { "name": "gw" }, "controllerName": "example.com/gateway", "conditions": [] });
        let first =
            merged(&json!({ "parents": [other.clone()] }), desired("HTTPRoute", &r, &by, &[]), "2026-12-02T10:00:00Z")
                .unwrap();
        assert_eq!(first.len(), 2);
        assert_eq!(first[0], other, "another controller's entry stays");
        assert_eq!(first[1]["conditions"][0]["lastTransitionTime"], "2026-12-02T10:00:00Z");
        let status = json!({ "parents": first });
        assert_eq!(
            merged(&status, desired("HTTPRoute", &r, &by, &[]), "2026-12-02T11:00:00Z"),
            None,
            "nothing changed: nothing written"
        );
        // The backend goes: ResolvedRefs turns False now, Accepted keeps its time.
        let none: Services<'_> = HashMap::new();
        let r2 = route(json!([{ "name": "web" }]), json!([{ "name": "gone", "port": 80 }]));
        let next = merged(&status, desired("HTTPRoute", &r2, &by, &[]), "2026-12-02T12:00:00Z").unwrap();
        assert_eq!(next[1]["conditions"][0]["lastTransitionTime"], "2026-12-02T10:00:00Z");
        assert_eq!(next[1]["conditions"][1]["lastTransitionTime"], "2026-12-02T12:00:00Z");
        assert_eq!(next[1]["conditions"][1]["status"], "False");
        assert!(merged(&status, desired("HTTPRoute", &r, &none, &[]), "t").is_some(), "the parent gone: rewritten");
    }
}
