//! The node binding: which identities a node may hold. A pure decision,
//! shared by the issuer and its Kubernetes view.

use super::Identity;

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// No credential, or one no node has.
    Unauthenticated,
    /// Another node's identity.
    OtherNode,
    /// A workload identity no enrolled workload on the caller's node has.
    NotOnNode,
    /// Not an identity of this trust domain, or not a node or workload one.
    BadIdentity,
    /// A valid credential of another account than the node daemons' (in
    /// Kubernetes: a workload's own service-account token).
    NotNodeAccount,
}

impl Refused {
    /// Every reason, in the order of the issuer's counters.
    pub const ALL: [Refused; 5] = [
        Refused::Unauthenticated,
        Refused::OtherNode,
        Refused::NotOnNode,
        Refused::BadIdentity,
        Refused::NotNodeAccount,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Unauthenticated => "unauthenticated",
            Refused::OtherNode => "other_node",
            Refused::NotOnNode => "not_on_node",
            Refused::BadIdentity => "bad_identity",
            Refused::NotNodeAccount => "not_node_account",
        }
    }
}

/// Whether `node` may hold `id`: its own node identity, or the identity
/// of a workload `placed` ((namespace, service account) of the enrolled
/// workloads on that node) names. A pure decision.
pub fn authorize(trust_domain: &str, node: &str, id: &Identity, placed: &[(String, String)]) -> Result<(), Refused> {
    if id.trust_domain() != trust_domain {
        return Err(Refused::BadIdentity);
    }
    if let Some(n) = id.node_name() {
        return if n == node { Ok(()) } else { Err(Refused::OtherNode) };
    }
    let on_node = placed.iter().any(|(ns, sa)| &Identity::from_parts(trust_domain, &format!("ns/{ns}/sa/{sa}")) == id);
    if on_node {
        Ok(())
    } else {
        Err(Refused::NotOnNode)
    }
}
