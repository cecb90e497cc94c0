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
use crate::model::route::{permits, ReferenceGrantDoc, RouteDoc};

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
/// per Service parentRef, with the cluster's `grants`.
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
    let refs = resolved_refs((kind, ns), &doc, &parent_refs, (services, grants), generation);
    parent_refs
        .iter()
        .filter(|r| is_service(r))
        .map(|r| {
            let pns = r["namespace"].as_str().unwrap_or(ns);
            let name = r["name"].as_str().unwrap_or("");
            let accepted = match (&doc, services.get(&(pns, name))) {
                (Err(e), _) => condition("Accepted", false, "UnsupportedValue", &e.to_string(), generation),
                (_, None) => {
                    condition("Accepted", false, "NoMatchingParent", &format!("no Service {pns}/{name}"), generation)
                }
                (_, Some(s)) if kernel_mode(s) => condition(
                    "Accepted",
                    false,
                    "UnsupportedValue",
                    &format!(
                        "Service {pns}/{name} is balanced in the kernel (mesh.io/mode: kernel), which sees no request"
                    ),
                    generation,
                ),
                (_, Some(s)) if r["port"].as_i64().is_some_and(|p| !has_port(s, p)) => condition(
                    "Accepted",
                    false,
                    "NoMatchingParent",
                    &format!("Service {pns}/{name} has no port {}", r["port"]),
                    generation,
                ),
                _ => condition("Accepted", true, "Accepted", "routed by the mesh", generation),
            };
            json!({ "parentRef": r, "controllerName": CONTROLLER, "conditions": [accepted, refs.clone()] })
        })
        .collect()
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

/// `ResolvedRefs`: every backendRef a Service of the route's namespace
/// (or a parent's, or one a ReferenceGrant lets the route name, decided
/// by the proxy's own rule: `model::route::permits`) that exists with the
/// port named.
fn resolved_refs(
    (kind, ns): (&str, &str),
    doc: &Result<RouteDoc, serde_json::Error>,
    parents: &[Value],
    (services, grants): (&Services<'_>, &[Arc<ReferenceGrantDoc>]),
    generation: Option<i64>,
) -> Value {
    let Ok(doc) = doc else {
        return condition("ResolvedRefs", false, "UnsupportedValue", "the route does not parse", generation);
    };
    let parent_ns: Vec<&str> = parents.iter().map(|r| r["namespace"].as_str().unwrap_or(ns)).collect();
    for b in doc.spec.rules.iter().flat_map(|r| &r.backend_refs) {
        if b.group.as_deref().is_some_and(|g| !g.is_empty()) || b.kind.as_deref().is_some_and(|k| k != "Service") {
            return condition(
                "ResolvedRefs",
                false,
                "InvalidKind",
                &format!("backendRef {} is not a Service", b.name),
                generation,
            );
        }
        let bns = b.namespace.as_deref().unwrap_or(ns);
        if bns != ns && !parent_ns.contains(&bns) && !permits(grants, (kind, ns), (bns, &b.name)) {
            let m = format!(
                "backendRef {bns}/{} is in another namespace and no ReferenceGrant there lets {kind}s of {ns} name it",
                b.name
            );
            return condition("ResolvedRefs", false, "RefNotPermitted", &m, generation);
        }
        match services.get(&(bns, b.name.as_str())) {
            None => {
                let m = format!("no Service {bns}/{}", b.name);
                return condition("ResolvedRefs", false, "BackendNotFound", &m, generation);
            }
            Some(s) if !b.port.is_some_and(|p| has_port(s, i64::from(p))) => {
                let m = format!("Service {bns}/{} has no port {:?}", b.name, b.port);
                return condition("ResolvedRefs", false, "BackendNotFound", &m, generation);
            }
            _ => {}
        }
    }
    condition("ResolvedRefs", true, "ResolvedRefs", "every backendRef resolves", generation)
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
            let store = super::watch::reflect_routes(&client, &ar, changed.clone(), &mut tasks);
            kinds.push((kind, ar, store));
        }
    }
    if kinds.is_empty() {
        info!("no Gateway API route kinds are served: no route status to write");
        return;
    }
    let grant = super::routes::grant_resource();
    let grants = match super::watch::served(&client, &grant).await {
        true => Some(super::watch::reflect_routes(&client, &grant, changed.clone(), &mut tasks)),
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
        let mut s = json!({ "metadata": { "name": name, "namespace": ns }, "spec": { "ports": [{ "port": port }] } });
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
        let svcs =
            [service("shop", "web", 80, false), service("shop", "v2", 8080, false), service("shop", "k", 80, true)];
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
