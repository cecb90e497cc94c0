//! The index of a state: what its services hold, counted, so that a write
//! is checked by what it changes.

use super::*;

/// Counts of what the services of a state hold, for the checks that span
/// services (names and `vip:port`s are unique, a VIP is no endpoint's
/// address) and for the slot tables they need: kept for the accepted
/// state, so that a write checks only the services it changes against it.
/// The same shape, signed, is the change a write makes to it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Index {
    /// `namespace/name`.
    pub(in crate::model) names: HashMap<ServiceKey, i64>,
    pub(in crate::model) addresses: HashMap<(IpAddr, u16), i64>,
    pub(in crate::model) vips: HashMap<IpAddr, i64>,
    pub(in crate::model) endpoint_ips: HashMap<IpAddr, i64>,
    /// Endpoint addresses (at each target port) in use.
    pub(in crate::model) endpoint_addrs: HashMap<SocketAddr, i64>,
    /// Frontends (service ports, times VIPs): one `SERVICES` entry each.
    pub(in crate::model) ports: i64,
    /// Kernel-mode tables at their largest, and how many tables have each
    /// largest size (for the one rewritten beside the rest).
    pub(in crate::model) slots: i64,
    pub(in crate::model) bounds: BTreeMap<usize, i64>,
}

/// Whether `k` is held after `change`.
pub(in crate::model) fn holds<K: std::hash::Hash + Eq>(
    base: &HashMap<K, i64>,
    change: &HashMap<K, i64>,
    k: &K,
) -> bool {
    base.get(k).copied().unwrap_or(0) + change.get(k).copied().unwrap_or(0) > 0
}

fn bump<K: std::hash::Hash + Eq>(m: &mut HashMap<K, i64>, k: K, by: i64) {
    let n = m.entry(k).or_default();
    *n += by;
}

impl Index {
    /// The index of `state`'s services.
    pub fn of(state: &State, table_size: u32) -> Self {
        let mut i = Index::default();
        for s in &state.services {
            i.count(s, 1, table_size);
        }
        i
    }

    /// Adds (`by` 1) or takes away (-1) one service.
    pub(in crate::model) fn count(&mut self, s: &Service, by: i64, table_size: u32) {
        bump(&mut self.names, s.key(), by);
        for vip in s.vips.iter() {
            bump(&mut self.vips, vip, by);
            for p in &s.ports {
                bump(&mut self.addresses, (vip, p.port.0), by);
            }
        }
        for e in &s.endpoints {
            bump(&mut self.endpoint_ips, e.ip, by);
        }
        let mut targets: Vec<Port> = s.ports.iter().map(|p| p.target_port).collect();
        targets.sort_unstable();
        targets.dedup();
        for t in targets {
            for e in &s.endpoints {
                bump(&mut self.endpoint_addrs, e.addr(t), by);
            }
        }
        self.ports += by * (s.ports.len() * s.vips.len()) as i64;
        if s.mode == Mode::Kernel {
            for bound in super::capacity::table_bounds(s, table_size) {
                self.slots += by * (s.ports.len() * bound) as i64;
                *self.bounds.entry(bound).or_default() += by * s.ports.len() as i64;
            }
        }
    }

    /// Applies a change made by [`validate`] (after the write was accepted).
    pub fn apply(&mut self, change: &Index) {
        fn merge<K: std::hash::Hash + Eq + Clone>(to: &mut HashMap<K, i64>, from: &HashMap<K, i64>) {
            for (k, by) in from {
                let n = to.entry(k.clone()).or_default();
                *n += by;
                if *n == 0 {
                    to.remove(k);
                }
            }
        }
        merge(&mut self.names, &change.names);
        merge(&mut self.addresses, &change.addresses);
        merge(&mut self.vips, &change.vips);
        merge(&mut self.endpoint_ips, &change.endpoint_ips);
        merge(&mut self.endpoint_addrs, &change.endpoint_addrs);
        self.ports += change.ports;
        self.slots += change.slots;
        for (b, by) in &change.bounds {
            let n = self.bounds.entry(*b).or_default();
            *n += by;
            if *n == 0 {
                self.bounds.remove(b);
            }
        }
    }

    /// Whether a service uses `addr` as an endpoint address.
    pub fn uses(&self, addr: SocketAddr) -> bool {
        self.endpoint_addrs.contains_key(&addr)
    }

    /// The largest table after `change`.
    pub(in crate::model) fn largest_with(&self, change: &Index) -> usize {
        let sizes = self.bounds.keys().chain(change.bounds.keys());
        sizes
            .filter(|b| self.bounds.get(b).copied().unwrap_or(0) + change.bounds.get(b).copied().unwrap_or(0) > 0)
            .copied()
            .max()
            .unwrap_or(0)
    }
}
