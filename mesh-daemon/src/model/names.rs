//! Validated names and small value types: parsed at the edge, trusted inside.

use std::fmt;

use super::errors::invalid;
use super::Invalid;

/// The namespace label that enrolls a namespace's pods in the mesh
/// (`mesh.io/inject: enabled`): discovery enrolls them, the issuer signs
/// only for them.
pub const INJECT_LABEL: &str = "mesh.io/inject";

/// A Kubernetes-style DNS-1123 label: 1 to 63 characters, lowercase letters,
/// digits and '-', starting and ending with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(String);

/// A node name: a DNS-1123 subdomain (labels joined by '.'), at most 253
/// characters. Shared: every endpoint on a node holds the node list's
/// copy (validation looks it up), not a string of its own.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeName(std::sync::Arc<str>);

impl std::borrow::Borrow<str> for NodeName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

fn is_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

impl Name {
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        if is_label(s) {
            Ok(Self(s.to_owned()))
        } else {
            Err(invalid!(
                "{s:?} is not a valid name: use 1 to 63 lowercase letters, digits or '-', starting and ending with a letter or digit"
            ))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl NodeName {
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        if !s.is_empty() && s.len() <= 253 && s.split('.').all(is_label) {
            Ok(Self(s.into()))
        } else {
            Err(invalid!(
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
    pub fn parse(v: i64) -> Result<Self, Invalid> {
        match u16::try_from(v) {
            Ok(p) if p > 0 => Ok(Port(p)),
            _ => Err(invalid!("{v} is not a port: use 1 to 65535")),
        }
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A duration written as a number and a unit: `500ms`, `5s`, `1m`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, Invalid> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| invalid!("{s:?} is not a duration: write e.g. 500ms, 5s or 1m"))?;
    match unit {
        "ms" => Ok(std::time::Duration::from_millis(n)),
        "s" => Ok(std::time::Duration::from_secs(n)),
        "m" => Ok(std::time::Duration::from_secs(n * 60)),
        _ => Err(invalid!("{s:?} is not a duration: write e.g. 500ms, 5s or 1m")),
    }
}

/// A duration (see [`parse_duration`]) from `min` to `max`.
pub(super) fn bounded_duration(
    s: &str,
    min: std::time::Duration,
    max: std::time::Duration,
) -> Result<std::time::Duration, Invalid> {
    let d = parse_duration(s)?;
    if d < min || d > max {
        return Err(invalid!("{s} is not between {min:?} and {max:?}"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        use std::time::Duration;
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        for bad in ["", "5", "s", "5h", "-1s", "1.5s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

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
