//! A hash map whose copies share everything a write did not touch: the
//! views the control plane publishes after each write (the route table,
//! the inbound checks) are copies of the last one with a few entries
//! changed, so a copy must not cost one clone per entry. Entries live in
//! a fixed number of shards behind `Arc`s; a copy clones the shard
//! pointers, and a write clones the one shard it changes (copy on write).
//!
//! Its keys (service ids, service ports, workload addresses) come from
//! the cluster's state, not from clients, and it is read on every
//! request: it hashes with foldhash, a few instructions a key, where the
//! standard library's SipHash costs about a hundred (BENCHMARKS.md,
//! thirteenth round).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::Arc;

use foldhash::fast::FixedState;

const SHARDS: usize = 64;

/// The hash that picks a key's shard: fixed, so that every copy agrees,
/// and seeded apart from [`IN_SHARD`]'s, or a shard's keys (which share
/// this hash modulo [`SHARDS`]) would crowd its table's buckets.
const SHARD: FixedState = FixedState::with_seed(0x5eed_0001);
/// The hash of a shard's own table.
const IN_SHARD: FixedState = FixedState::with_seed(0x5eed_0002);

type Shard<K, V> = Arc<HashMap<K, V, FixedState>>;

#[derive(Debug)]
pub struct SharedMap<K, V> {
    shards: Vec<Shard<K, V>>,
}

impl<K, V> Clone for SharedMap<K, V> {
    fn clone(&self) -> Self {
        Self { shards: self.shards.clone() }
    }
}

impl<K, V> Default for SharedMap<K, V> {
    fn default() -> Self {
        Self { shards: (0..SHARDS).map(|_| Arc::new(HashMap::with_hasher(IN_SHARD))).collect() }
    }
}

/// The shard of a key: a fixed hash, so that every copy agrees.
fn shard<Q: Hash + ?Sized>(k: &Q) -> usize {
    SHARD.hash_one(k) as usize % SHARDS
}

impl<K: Hash + Eq + Clone, V: Clone> SharedMap<K, V> {
    pub fn get<Q: Hash + Eq + ?Sized>(&self, k: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        self.shards[shard(k)].get(k)
    }

    /// Copies the key's shard if another map shares it.
    pub fn insert(&mut self, k: K, v: V) -> Option<V> {
        Arc::make_mut(&mut self.shards[shard(&k)]).insert(k, v)
    }

    pub fn remove<Q: Hash + Eq + ?Sized>(&mut self, k: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        let s = &mut self.shards[shard(k)];
        if !s.contains_key(k) {
            return None;
        }
        Arc::make_mut(s).remove(k)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.shards.iter().flat_map(|s| s.iter())
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len()).sum()
    }
}

impl<K: Hash + Eq + Clone, V: Clone> FromIterator<(K, V)> for SharedMap<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut m = Self::default();
        for (k, v) in iter {
            m.insert(k, v);
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_shares_what_a_write_did_not_touch() {
        let a: SharedMap<String, u32> = (0..1000).map(|i| (format!("s{i}"), i)).collect();
        let mut b = a.clone();
        b.insert("s7".into(), 70);
        assert_eq!(b.remove("s8"), Some(8));
        assert_eq!(b.remove("nope"), None);
        assert_eq!((a.get("s7"), a.get("s8"), a.len()), (Some(&7), Some(&8), 1000), "the original is as it was");
        assert_eq!((b.get("s7"), b.get("s8"), b.len()), (Some(&70), None, 999));
        let shared = a.shards.iter().zip(&b.shards).filter(|(x, y)| Arc::ptr_eq(x, y)).count();
        assert!(shared >= SHARDS - 2, "only the shards written to were copied: {shared} of {SHARDS} shared");
        let mut keys: Vec<u32> = b.values().copied().collect();
        keys.sort();
        assert_eq!(keys.len(), 999);
    }
}
