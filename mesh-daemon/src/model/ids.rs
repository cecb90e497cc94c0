//! Stable ids for service ports. The kernel records a connection's service
//! by id, so an id must keep meaning the same service port across writes
//! and restarts, and is never given to another one.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::Name;

/// A service, as users name it: `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub namespace: Name,
    pub name: Name,
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One port of a service: what a route, its policy and its series belong
/// to (`namespace/name:port`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    pub service: ServiceKey,
    pub port: u16,
}

impl fmt::Display for PortKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.service, self.port)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceIds {
    /// `namespace/name:port` -> id.
    ids: BTreeMap<String, u32>,
    /// Next id to give; ids start at 1 and are never reused.
    next: u32,
}

impl ServiceIds {
    pub fn get(&self, key: &str) -> Option<u32> {
        self.ids.get(key).copied()
    }

    /// The next id to give.
    pub fn next(&self) -> u32 {
        self.next
    }

    /// These ids with `set` given, `removed` taken away and `next` as the
    /// next id: how a journal entry replays a change of ids.
    pub fn with(&self, set: &[(String, u32)], removed: &[String], next: u32) -> Self {
        let mut out = self.clone();
        for k in removed {
            out.ids.remove(k);
        }
        for (k, id) in set {
            out.ids.insert(k.clone(), *id);
        }
        out.next = next;
        out
    }

    /// The ids for exactly `keys`: kept where a key had one, new ones
    /// otherwise; keys that are gone lose theirs.
    pub fn assign<'a>(&self, keys: impl IntoIterator<Item = &'a String>) -> Self {
        let mut next = self.next.max(1);
        let mut ids = BTreeMap::new();
        let mut fresh = Vec::new();
        for k in keys {
            match self.ids.get(k) {
                Some(id) => {
                    ids.insert(k.clone(), *id);
                }
                None => fresh.push(k.clone()),
            }
        }
        fresh.sort();
        for k in fresh {
            ids.insert(k, next);
            next += 1;
        }
        Self { ids, next }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_never_reused() {
        let keys = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let a = ServiceIds::default().assign(&keys(&["d/web:80", "d/db:5432"]));
        assert_eq!((a.get("d/db:5432"), a.get("d/web:80")), (Some(1), Some(2)));
        let b = a.assign(&keys(&["d/web:80", "d/api:80"]));
        assert_eq!(b.get("d/web:80"), Some(2), "kept");
        assert_eq!(b.get("d/api:80"), Some(3), "new id, not the freed 1");
        assert_eq!(b.get("d/db:5432"), None);
        let c = b.assign(&keys(&["d/db:5432"]));
        assert_eq!(c.get("d/db:5432"), Some(4));
    }
}
