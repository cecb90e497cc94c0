//! Validated names and small value types: parsed at the edge, trusted inside.

use std::fmt;

/// A Kubernetes-style DNS-1123 label: 1 to 63 characters, lowercase letters,
/// digits and '-', starting and ending with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(String);

/// A node name: a DNS-1123 subdomain (labels joined by '.'), at most 253
/// characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeName(String);

fn is_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

impl Name {
    pub fn parse(s: &str) -> Result<Self, String> {
        if is_label(s) {
            Ok(Self(s.to_owned()))
        } else {
            Err(format!(
                "{s:?} is not a valid name: use 1 to 63 lowercase letters, digits or '-', starting and ending with a letter or digit"
            ))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl NodeName {
    pub fn parse(s: &str) -> Result<Self, String> {
        if !s.is_empty() && s.len() <= 253 && s.split('.').all(is_label) {
            Ok(Self(s.to_owned()))
        } else {
            Err(format!(
                "{s:?} is not a valid node name: use lowercase letters, digits, '-' and '.', at most 253 characters"
            ))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An endpoint's share of new connections relative to its peers. 0 drains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Weight(pub u16);

impl Weight {
    pub const MAX: i64 = u16::MAX as i64;
}

/// A TCP port, 1 to 65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Port(pub u16);

impl Port {
    pub fn parse(v: i64) -> Result<Self, String> {
        match u16::try_from(v) {
            Ok(p) if p > 0 => Ok(Port(p)),
            _ => Err(format!("{v} is not a port: use 1 to 65535")),
        }
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert!(Name::parse("web-1").is_ok());
        for bad in ["", "-a", "a-", "Web", "a_b", "a.b", &"x".repeat(64)] {
            assert!(Name::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn node_names() {
        assert!(NodeName::parse("kind-worker.local").is_ok());
        for bad in ["", ".a", "a..b", "A"] {
            assert!(NodeName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ports() {
        assert_eq!(Port::parse(80), Ok(Port(80)));
        for bad in [0, -1, 65536] {
            assert!(Port::parse(bad).is_err());
        }
    }
}
