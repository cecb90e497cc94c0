//! SPIFFE IDs, the names of workloads and nodes in certificates: a
//! workload is `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceAccount>`,
//! a node `spiffe://<trust-domain>/ns/mesh-system/node/<node>`. Part of the
//! model (policies and workloads name them); identity/ issues them.

use std::fmt;

use super::{Name, NodeName};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("{0:?} is not a SPIFFE ID: it must start with spiffe://")]
    Scheme(String),
    #[error("{0:?}: the trust domain must be lowercase letters, digits, '.', '-' or '_'")]
    TrustDomain(String),
    #[error("{0:?}: the path must be non-empty segments of letters, digits, '.', '-' or '_'")]
    Path(String),
}

/// A validated SPIFFE ID, kept as its URI so that its text and its
/// principal (what policies match) are slices, never made per request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    /// `spiffe://<trust domain>/<path>`.
    uri: String,
    /// Where the trust domain ends (the `/` before the path).
    td_end: usize,
}

const SCHEME: &str = "spiffe://";

fn td_ok(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

fn segment_ok(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl Identity {
    pub fn parse(uri: &str) -> Result<Self, IdentityError> {
        let rest = uri.strip_prefix(SCHEME).ok_or_else(|| IdentityError::Scheme(uri.to_owned()))?;
        let (td, path) = rest.split_once('/').ok_or_else(|| IdentityError::Path(uri.to_owned()))?;
        if !td_ok(td) {
            return Err(IdentityError::TrustDomain(uri.to_owned()));
        }
        if !path.split('/').all(segment_ok) {
            return Err(IdentityError::Path(uri.to_owned()));
        }
        Ok(Self::from_parts(td, path))
    }

    /// A trust domain name alone.
    pub fn check_trust_domain(td: &str) -> Result<(), IdentityError> {
        if td_ok(td) {
            Ok(())
        } else {
            Err(IdentityError::TrustDomain(td.to_owned()))
        }
    }

    pub fn workload(td: &str, namespace: &Name, service_account: &Name) -> Self {
        Self::from_parts(td, &format!("ns/{namespace}/sa/{service_account}"))
    }

    /// An identity of `td` with path `path` (`ns/.../...`).
    pub fn from_parts(td: &str, path: &str) -> Self {
        Self { uri: format!("{SCHEME}{td}/{path}"), td_end: SCHEME.len() + td.len() }
    }

    fn path(&self) -> &str {
        &self.uri[self.td_end + 1..]
    }

    /// The URI, `spiffe://<trust domain>/<path>`.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// The identity as Istio's policies name it: `<trust domain>/<path>`.
    pub fn principal(&self) -> &str {
        &self.uri[SCHEME.len()..]
    }

    /// The node a node identity names.
    pub fn node_name(&self) -> Option<&str> {
        self.path().strip_prefix("ns/mesh-system/node/")
    }

    pub fn node(td: &str, node: &NodeName) -> Self {
        Self::from_parts(td, &format!("ns/mesh-system/node/{node}"))
    }

    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME.len()..self.td_end]
    }

    /// The namespace of a workload or node identity (`ns/<namespace>/...`).
    pub fn namespace(&self) -> Option<&str> {
        let mut parts = self.path().split('/');
        (parts.next() == Some("ns")).then(|| parts.next()).flatten()
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_build() {
        let id = Identity::parse("spiffe://cluster.local/ns/default/sa/web").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), Some("default"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/web");
        let w = Identity::workload("cluster.local", &Name::parse("default").unwrap(), &Name::parse("web").unwrap());
        assert_eq!(w, id);
        let n = Identity::node("cluster.local", &NodeName::parse("node-a").unwrap());
        assert_eq!(n.to_string(), "spiffe://cluster.local/ns/mesh-system/node/node-a");
        assert_eq!(n.namespace(), Some("mesh-system"));
        assert_eq!(n.node_name(), Some("node-a"));
    }

    #[test]
    fn rejects_malformed_ids() {
        for bad in [
            "http://cluster.local/ns/a/sa/b",
            "spiffe://",
            "spiffe://cluster.local",
            "spiffe://Cluster.Local/ns/a",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/ns/a/../b",
            "spiffe://cluster.local/ns/a b",
        ] {
            assert!(Identity::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Identity::parse("x").unwrap_err().to_string(),
            "\"x\" is not a SPIFFE ID: it must start with spiffe://"
        );
    }
}
