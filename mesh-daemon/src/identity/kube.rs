//! How the issuer knows its callers in Kubernetes (`ca serve
//! --kubernetes`), as istiod does for ztunnel:
//!
//! - A node daemon presents its projected service-account token, bound to
//!   the issuer's audience and to the daemon's pod. The issuer has the API
//!   server review it (TokenReview): it must be valid for that audience and
//!   belong to the daemon's service account. The pod it is bound to, read
//!   back from the API server (same UID, not ended), names the node by its
//!   `spec.nodeName`; when the token also carries the node it was issued
//!   on (Kubernetes 1.32+), the two must agree.
//! - A workload identity `ns/N/sa/S` is issued to node X only when a pod
//!   of service account S runs (or is starting) on X in namespace N, and N
//!   is enrolled (labelled `mesh.io/inject=enabled`).
//!
//! The decisions are pure functions of what the API server answered, so
//! they are unit-tested here; [`Kube`] only asks.

use std::collections::BTreeMap;

use k8s_openapi::api::authentication::v1::TokenReviewStatus;
use k8s_openapi::api::core::v1::{Namespace, Pod};

use super::binding::Refused;

/// The audience node tokens must be minted for.
pub const AUDIENCE: &str = "mesh-issuer";
/// What a bound service-account token tells of its pod and node.
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const NODE_NAME: &str = "authentication.kubernetes.io/node-name";
use crate::model::INJECT_LABEL;

/// A refusal and what it was about, for the log.
pub type Denial = (Refused, String);

/// The daemon pod a reviewed token is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The node the token says it was issued on, when it says.
    pub node: Option<String>,
}

fn one<'a>(extra: &'a BTreeMap<String, Vec<String>>, key: &str) -> Option<&'a str> {
    extra.get(key).and_then(|v| v.first()).map(String::as_str).filter(|s| !s.is_empty())
}

/// From the API server's review of a token: the pod it is bound to, when
/// it is valid for `audience` and belongs to the service account
/// `account` (namespace, name).
pub fn bound_pod(
    status: Option<&TokenReviewStatus>,
    audience: &str,
    account: (&str, &str),
) -> Result<BoundPod, Denial> {
    let unauth = |why: String| Err((Refused::Unauthenticated, why));
    let Some(s) = status else { return unauth("the API server's review has no status".into()) };
    if s.authenticated != Some(true) {
        return unauth(format!("the API server did not accept the token: {}", s.error.as_deref().unwrap_or("invalid")));
    }
    if !s.audiences.as_ref().is_some_and(|a| a.iter().any(|x| x == audience)) {
        return unauth(format!("the token is not for audience {audience:?}"));
    }
    let user = s.user.as_ref().and_then(|u| u.username.as_deref()).unwrap_or_default();
    let want = format!("system:serviceaccount:{}:{}", account.0, account.1);
    if user != want {
        return Err((Refused::NotNodeAccount, format!("{user} is not the node daemons' account {want}")));
    }
    let extra = s.user.as_ref().and_then(|u| u.extra.clone()).unwrap_or_default();
    let (Some(name), Some(uid)) = (one(&extra, POD_NAME), one(&extra, POD_UID)) else {
        return unauth("the token is not bound to a pod (a projected service-account token is)".into());
    };
    Ok(BoundPod {
        namespace: account.0.to_owned(),
        name: name.to_owned(),
        uid: uid.to_owned(),
        node: one(&extra, NODE_NAME).map(str::to_owned),
    })
}

fn ended(p: &Pod) -> bool {
    matches!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
}

/// The node of the daemon pod a token is bound to, from `pod` as the API
/// server has it now (None: not found).
pub fn node_of(bound: &BoundPod, pod: Option<&Pod>) -> Result<String, Denial> {
    let unauth = |why: String| Err((Refused::Unauthenticated, why));
    let who = format!("pod {}/{}", bound.namespace, bound.name);
    let Some(pod) = pod else { return unauth(format!("the token's {who} is gone")) };
    if pod.metadata.uid.as_deref() != Some(bound.uid.as_str()) {
        return unauth(format!("the token's {who} was replaced (another UID)"));
    }
    if ended(pod) {
        return unauth(format!("the token's {who} has ended"));
    }
    let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
        return unauth(format!("the token's {who} is not scheduled on a node"));
    };
    match &bound.node {
        Some(n) if *n != node => unauth(format!("the token was issued on node {n}, its {who} runs on {node}")),
        _ => Ok(node),
    }
}

/// (namespace, service account) of each pod of `pods` that the mesh
/// enrolls on `node`: in `namespace` (as the API server has it; None: not
/// found) when it is labelled for the mesh, scheduled on `node`, not on
/// the host's network, and not ended.
pub fn placed(namespace: Option<&Namespace>, pods: &[Pod], node: &str) -> Vec<(String, String)> {
    let Some(ns) = namespace else { return Vec::new() };
    let enrolled = ns.metadata.labels.as_ref().and_then(|l| l.get(INJECT_LABEL)).is_some_and(|v| v == "enabled");
    let Some(ns_name) = ns.metadata.name.as_deref().filter(|_| enrolled) else { return Vec::new() };
    pods.iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(ns_name) && !ended(p))
        .filter_map(|p| {
            let spec = p.spec.as_ref()?;
            (spec.node_name.as_deref() == Some(node) && spec.host_network != Some(true))
                .then(|| (ns_name.to_owned(), spec.service_account_name.clone().unwrap_or_else(|| "default".into())))
        })
        .collect()
}

/// Asks the API server, as the issuer's service account (it needs to
/// create TokenReviews, get and list pods, and get namespaces).
#[cfg(feature = "kubernetes")]
pub struct Kube {
    pub client: kube::Client,
    pub audience: String,
    /// The node daemons' service account: (namespace, name).
    pub account: (String, String),
}

/// Why the API server could not decide.
#[cfg(feature = "kubernetes")]
pub type Unavailable = String;

#[cfg(feature = "kubernetes")]
impl Kube {
    /// The node whose daemon `token` belongs to.
    pub async fn node_of(&self, token: &str) -> Result<Result<String, Denial>, Unavailable> {
        use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
        use kube::api::{Api, PostParams};
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_owned()), audiences: Some(vec![self.audience.clone()]) },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| format!("TokenReview: {e}"))?;
        let bound = match bound_pod(reviewed.status.as_ref(), &self.audience, (&self.account.0, &self.account.1)) {
            Ok(b) => b,
            Err(d) => return Ok(Err(d)),
        };
        let pod = Api::<Pod>::namespaced(self.client.clone(), &bound.namespace)
            .get_opt(&bound.name)
            .await
            .map_err(|e| format!("reading pod {}/{}: {e}", bound.namespace, bound.name))?;
        Ok(node_of(&bound, pod.as_ref()))
    }

    /// What [`placed`] says of namespace `ns` on `node`.
    pub async fn placed(&self, node: &str, ns: &str) -> Result<Vec<(String, String)>, Unavailable> {
        use kube::api::{Api, ListParams};
        let namespace = Api::<Namespace>::all(self.client.clone())
            .get_opt(ns)
            .await
            .map_err(|e| format!("reading namespace {ns}: {e}"))?;
        if namespace.is_none() {
            return Ok(Vec::new());
        }
        let pods = Api::<Pod>::namespaced(self.client.clone(), ns)
            .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
            .await
            .map_err(|e| format!("listing the pods of {ns} on {node}: {e}"))?;
        Ok(placed(namespace.as_ref(), &pods.items, node))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;
    use serde_json::json;

    fn review(authenticated: bool, audience: &str, user: &str, extra: serde_json::Value) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(authenticated),
            audiences: Some(vec![audience.to_owned()]),
            user: Some(UserInfo {
                username: Some(user.to_owned()),
                extra: serde_json::from_value(extra).unwrap(),
                ..Default::default()
            }),
            error: None,
        }
    }

    const DAEMON: &str = "system:serviceaccount:mesh-system:mesh-daemon";
    const ACCOUNT: (&str, &str) = ("mesh-system", "mesh-daemon");

    fn bound_extra(node: Option<&str>) -> serde_json::Value {
        let mut e = json!({ POD_NAME: ["mesh-daemon-x1"], POD_UID: ["u-1"] });
        if let Some(n) = node {
            e[NODE_NAME] = json!([n]);
        }
        e
    }

    fn pod(ns: &str, name: &str, uid: &str, node: &str, sa: &str, phase: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": { "namespace": ns, "name": name, "uid": uid },
            "spec": { "nodeName": node, "serviceAccountName": sa, "containers": [] },
            "status": { "phase": phase },
        }))
        .unwrap()
    }

    #[test]
    fn only_a_valid_pod_bound_token_of_the_daemon_account_for_our_audience_names_a_pod() {
        let ok = review(true, AUDIENCE, DAEMON, bound_extra(Some("a")));
        let b = bound_pod(Some(&ok), AUDIENCE, ACCOUNT).unwrap();
        assert_eq!((b.name.as_str(), b.uid.as_str(), b.node.as_deref()), ("mesh-daemon-x1", "u-1", Some("a")));

        let refused = |s: TokenReviewStatus| bound_pod(Some(&s), AUDIENCE, ACCOUNT).unwrap_err().0;
        assert_eq!(refused(review(false, AUDIENCE, DAEMON, bound_extra(None))), Refused::Unauthenticated);
        assert_eq!(
            refused(review(true, "https://kubernetes.default.svc", DAEMON, bound_extra(None))),
            Refused::Unauthenticated
        );
        assert_eq!(
            refused(review(true, AUDIENCE, "system:serviceaccount:shop:web", bound_extra(None))),
            Refused::NotNodeAccount,
            "a workload's own token"
        );
        assert_eq!(
            refused(review(true, AUDIENCE, DAEMON, json!({}))),
            Refused::Unauthenticated,
            "a legacy secret token"
        );
        assert_eq!(bound_pod(None, AUDIENCE, ACCOUNT).unwrap_err().0, Refused::Unauthenticated);
    }

    #[test]
    fn the_node_is_the_bound_pods_as_the_api_server_has_it_now() {
        let b = |node: Option<&str>| BoundPod {
            namespace: "mesh-system".into(),
            name: "mesh-daemon-x1".into(),
            uid: "u-1".into(),
            node: node.map(str::to_owned),
        };
        let running = pod("mesh-system", "mesh-daemon-x1", "u-1", "a", "mesh-daemon", "Running");
        assert_eq!(node_of(&b(None), Some(&running)), Ok("a".to_owned()));
        assert_eq!(node_of(&b(Some("a")), Some(&running)), Ok("a".to_owned()));
        let refused = |bp: BoundPod, p: Option<&Pod>| node_of(&bp, p).unwrap_err();
        assert!(refused(b(Some("b")), Some(&running)).1.contains("issued on node b"));
        assert!(refused(b(None), None).1.contains("gone"));
        let replaced = pod("mesh-system", "mesh-daemon-x1", "u-2", "a", "mesh-daemon", "Running");
        assert!(refused(b(None), Some(&replaced)).1.contains("replaced"));
        let ended = pod("mesh-system", "mesh-daemon-x1", "u-1", "a", "mesh-daemon", "Failed");
        assert!(refused(b(None), Some(&ended)).1.contains("ended"));
    }

    #[test]
    fn workloads_are_placed_on_a_node_only_when_enrolled_running_there_and_not_on_the_host_network() {
        let ns = |labels: serde_json::Value| -> Namespace {
            serde_json::from_value(json!({ "metadata": { "name": "shop", "labels": labels } })).unwrap()
        };
        let mut host = pod("shop", "h", "u-h", "a", "host", "Running");
        host.spec.as_mut().unwrap().host_network = Some(true);
        let mut no_sa = pod("shop", "d", "u-d", "a", "x", "Pending");
        no_sa.spec.as_mut().unwrap().service_account_name = None;
        let pods = vec![
            pod("shop", "web-1", "u-1", "a", "web", "Running"),
            pod("shop", "db-1", "u-2", "b", "db", "Running"),
            pod("shop", "old", "u-3", "a", "old", "Succeeded"),
            pod("other", "x", "u-4", "a", "other", "Running"),
            host,
            no_sa,
        ];
        let enrolled = ns(json!({ INJECT_LABEL: "enabled" }));
        let got = placed(Some(&enrolled), &pods, "a");
        assert_eq!(got, [("shop".to_owned(), "web".to_owned()), ("shop".to_owned(), "default".to_owned())]);
        assert!(placed(Some(&ns(json!({}))), &pods, "a").is_empty(), "not enrolled");
        assert!(placed(None, &pods, "a").is_empty());
    }
}
