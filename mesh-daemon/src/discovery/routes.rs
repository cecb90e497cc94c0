//! Gateway API routes from the cluster (`gateway.networking.k8s.io/v1`
//! HTTPRoute and GRPCRoute) into the state document: the objects as the
//! API server returns them, with only their name, namespace and spec
//! kept, oldest first (the Gateway API breaks precedence ties by age).
//! A route that does not parse is left out with the reason; one the
//! model refuses (a kernel-mode parent, a bad regex) is left out when the
//! state is written (see `watch::apply`), and the others work. A backend
//! that does not resolve (no such Service yet, another namespace without
//! a ReferenceGrant) keeps its route: its share is answered 500. The
//! ReferenceGrants (`v1beta1`) come along.

use std::sync::Arc;

use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;

use crate::model::route::{ReferenceGrantDoc, RouteDoc};

pub const GROUP: &str = "gateway.networking.k8s.io";

/// The kinds watched: (kind, plural).
pub const KINDS: [(&str, &str); 2] = [("HTTPRoute", "httproutes"), ("GRPCRoute", "grpcroutes")];

/// The API resource of one route kind.
pub fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, "v1", kind), plural)
}

/// ReferenceGrant, as every Gateway API release serves it (`v1beta1`).
pub fn grant_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, "v1beta1", "ReferenceGrant"), "referencegrants")
}

/// The ReferenceGrants of `objects` as the state document's, by
/// namespace and name; what does not parse goes to `skipped`.
pub fn grants(objects: &[Arc<DynamicObject>], skipped: &mut Vec<String>) -> Vec<Arc<ReferenceGrantDoc>> {
    let mut out: Vec<Arc<ReferenceGrantDoc>> = objects
        .iter()
        .filter_map(|o| {
            let name = o.metadata.name.as_deref()?;
            let ns = o.metadata.namespace.as_deref().unwrap_or("default");
            let doc = serde_json::from_value(json!({
                "apiVersion": format!("{GROUP}/v1beta1"),
                "kind": "ReferenceGrant",
                "metadata": { "name": name, "namespace": ns },
                "spec": o.data.get("spec").cloned().unwrap_or_else(|| json!({})),
            }));
            doc.map_err(|e| skipped.push(format!("ReferenceGrant {ns}/{name}: {e}; left out"))).ok().map(Arc::new)
        })
        .collect();
    out.sort_by(|a, b| (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name)));
    out
}

/// Route object `o` (of `kind`) as the state document's route: its name,
/// namespace (`default` when none) and spec; the cluster's other fields
/// are dropped.
pub fn doc(kind: &str, o: &DynamicObject) -> Result<RouteDoc, serde_json::Error> {
    serde_json::from_value(json!({
        "apiVersion": format!("{GROUP}/v1"),
        "kind": kind,
        "metadata": { "name": o.metadata.name, "namespace": o.metadata.namespace.as_deref().unwrap_or("default") },
        "spec": o.data.get("spec").cloned().unwrap_or_else(|| json!({})),
    }))
}

/// The route documents of `objects` (`kind` each), oldest first; what does
/// not parse goes to `skipped` with the reason.
pub fn translate(objects: &[(&str, &DynamicObject)], skipped: &mut Vec<String>) -> Vec<Arc<RouteDoc>> {
    let mut out: Vec<(Option<String>, String, Arc<RouteDoc>)> = Vec::new();
    for (kind, o) in objects {
        let (Some(name), ns) = (o.metadata.name.as_deref(), o.metadata.namespace.as_deref().unwrap_or("default"))
        else {
            continue;
        };
        let what = format!("{kind} {ns}/{name}");
        match doc(kind, o) {
            // Attached to Gateways only: another controller's route.
            Ok(d) if !d.spec.parent_refs.iter().any(|r| r.is_service()) => {}
            Ok(d) => {
                let created = o.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string());
                out.push((created, format!("{ns}/{name}/{kind}"), Arc::new(d)));
            }
            Err(e) => skipped.push(format!("{what}: {e}; left out")),
        }
    }
    // Oldest first; ties (and routes without a timestamp) by name.
    out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    out.into_iter().map(|(_, _, d)| d).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(kind: &str, name: &str, created: &str, spec: serde_json::Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": kind,
            "metadata": { "name": name, "namespace": "shop", "creationTimestamp": created,
                          "managedFields": [{ "manager": "kubectl" }], "labels": { "a": "b" } },
            "spec": spec,
            "status": { "parents": [] },
        }))
        .unwrap()
    }

    #[test]
    fn routes_are_kept_oldest_first_and_a_bad_one_is_left_out_with_its_reason() {
        let spec = json!({ "parentRefs": [{ "name": "web" }], "rules": [{ "backendRefs": [{ "name": "web-v2", "port": 80 }] }] });
        let newer = object("HTTPRoute", "a-newer", "2026-12-02T10:00:00Z", spec.clone());
        let older = object("GRPCRoute", "z-older", "2026-12-01T10:00:00Z", spec.clone());
        let bad = object(
            "HTTPRoute",
            "bad",
            "2026-12-01T09:00:00Z",
            json!({ "parentRefs": [{ "name": "web" }], "rulez": [] }),
        );
        let gateway = object(
            "HTTPRoute",
            "for-a-gateway",
            "2026-12-01T08:00:00Z",
            json!({ "parentRefs": [{ "group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "gw" }] }),
        );
        let mut skipped = Vec::new();
        let docs = translate(
            &[("HTTPRoute", &newer), ("GRPCRoute", &older), ("HTTPRoute", &bad), ("HTTPRoute", &gateway)],
            &mut skipped,
        );
        let names: Vec<(&str, &str)> = docs.iter().map(|d| (d.kind.as_str(), d.metadata.name.as_str())).collect();
        assert_eq!(names, [("GRPCRoute", "z-older"), ("HTTPRoute", "a-newer")], "a Gateway's route is not the mesh's");
        assert_eq!(docs[1].metadata.namespace, "shop");
        assert_eq!(docs[1].spec.rules[0].backend_refs[0].name, "web-v2");
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].starts_with("HTTPRoute shop/bad: unknown field `rulez`"), "{skipped:?}");
    }
}
