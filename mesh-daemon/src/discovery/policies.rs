//! Istio `AuthorizationPolicy` objects (`security.istio.io/v1`) from the
//! cluster into the state document's `policies`: name, namespace, the
//! dry-run annotation and the spec. One that does not parse (a field this
//! mesh does not implement, say) fails closed instead of being dropped:
//! [`crate::model::authz::fail_closed`] stands in for it, and the reason
//! is logged. One the model refuses is replaced the same way when the
//! state is written (see `watch::apply`).

use std::sync::Arc;

use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;

use crate::model::authz::{fail_closed, PolicyDoc};

pub const GROUP: &str = "security.istio.io";
use crate::model::authz::DRY_RUN;

/// The API resource of AuthorizationPolicy.
pub fn resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(GROUP, "v1", "AuthorizationPolicy"),
        "authorizationpolicies",
    )
}

/// Whether object `o` asks for a dry run.
fn dry_run(o: &DynamicObject) -> bool {
    o.metadata.annotations.as_ref().and_then(|a| a.get(DRY_RUN)).is_some_and(|v| v == "true")
}

/// The policy documents of `objects`, by namespace and name; one that
/// does not parse is replaced by its fail-closed stand-in, with the
/// reason in `skipped`.
pub fn translate(objects: &[Arc<DynamicObject>], skipped: &mut Vec<String>) -> Vec<Arc<PolicyDoc>> {
    let mut out: Vec<Arc<PolicyDoc>> = Vec::new();
    for o in objects {
        let Some(name) = o.metadata.name.as_deref() else { continue };
        let ns = o.metadata.namespace.as_deref().unwrap_or("default");
        let spec = o.data.get("spec").cloned().unwrap_or_else(|| json!({}));
        let mut annotations = json!({});
        if let Some(v) = o.metadata.annotations.as_ref().and_then(|a| a.get(DRY_RUN)) {
            annotations[DRY_RUN] = json!(v);
        }
        let doc = serde_json::from_value::<PolicyDoc>(json!({
            "apiVersion": format!("{GROUP}/v1"),
            "kind": "AuthorizationPolicy",
            "metadata": { "name": name, "namespace": ns, "annotations": annotations },
            "spec": spec,
        }));
        match doc {
            Ok(d) => out.push(Arc::new(d)),
            Err(e) => {
                let stand_in = fail_closed(name, ns, dry_run(o), &spec);
                let what = if stand_in.is_some() { "it fails closed" } else { "an AUDIT policy: left out" };
                skipped.push(format!("AuthorizationPolicy {ns}/{name}: {e}; {what}"));
                out.extend(stand_in.map(Arc::new));
            }
        }
    }
    out.sort_by(|a, b| (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(name: &str, spec: serde_json::Value) -> Arc<DynamicObject> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                "metadata": { "name": name, "namespace": "shop", "labels": { "a": "b" } },
                "spec": spec,
            }))
            .unwrap(),
        )
    }

    #[test]
    fn a_policy_that_does_not_parse_fails_closed_and_says_why() {
        let good =
            object("good", json!({ "action": "DENY", "rules": [{ "to": [{ "operation": { "paths": ["/x"] } }] }] }));
        let allow = object(
            "broken-allow",
            json!({ "selector": { "matchLabels": { "app": "web" } },
                    "rules": [{ "from": [{ "source": { "requestPrincipals": ["*"] } }] }] }),
        );
        let deny =
            object("broken-deny", json!({ "action": "DENY", "rules": [{ "when": [{ "key": "x", "valuez": [] }] }] }));
        let audit = object("broken-audit", json!({ "action": "AUDIT", "rulez": [] }));
        let mut skipped = Vec::new();
        let docs = translate(&[good, allow, deny, audit], &mut skipped);
        let names: Vec<&str> = docs.iter().map(|d| d.metadata.name.as_str()).collect();
        assert_eq!(names, ["broken-allow", "broken-deny", "good"]);
        // A broken ALLOW allows nothing, on the workloads it selected.
        assert_eq!(docs[0].spec.action.as_deref(), Some("ALLOW"));
        assert!(docs[0].spec.rules.is_empty());
        assert_eq!(docs[0].spec.selector.as_ref().unwrap().match_labels["app"], "web");
        // A broken DENY denies everything.
        assert_eq!(docs[1].spec.action.as_deref(), Some("DENY"));
        assert_eq!(docs[1].spec.rules.len(), 1);
        assert_eq!(skipped.len(), 3, "{skipped:?}");
        assert!(
            skipped[0].contains("AuthorizationPolicy shop/broken-allow: unknown field `requestPrincipals`"),
            "{skipped:?}"
        );
        assert!(skipped[0].ends_with("it fails closed"), "{skipped:?}");
        assert!(skipped[2].ends_with("an AUDIT policy: left out"), "{skipped:?}");
    }
}
