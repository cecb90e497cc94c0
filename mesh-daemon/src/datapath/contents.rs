//! The map contents a state calls for: pure, so it is tested without a kernel.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use mesh_common::{Ip, ServiceKey, SockAddr, WorkloadValue, IPPROTO_TCP, MODE_KERNEL, MODE_PROXY};

use crate::balance;
use crate::balance::select::Candidate;
use crate::model::slots;
use crate::model::{Addresses, Delta, Endpoint, Frontend, MapCapacity, Mode, State};

/// One `SERVICES` entry as wanted; for kernel mode with its slot table.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredService {
    pub id: u32,
    pub mode: u8,
    /// Kernel mode: the backend of each slot. Empty: connects are refused.
    pub slots: Vec<SockAddr>,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct MapContents {
    pub workloads: BTreeMap<u64, WorkloadValue>,
    pub services: BTreeMap<ServiceKey, DesiredService>,
}

pub fn service_key(vip: IpAddr, port: u16) -> ServiceKey {
    ServiceKey { vip: vip.into(), port_be: port.to_be(), proto: IPPROTO_TCP, _pad: 0 }
}

impl MapContents {
    /// `cookies`: the netns cookie of each enrolled workload of this node;
    /// `proxy`: where their redirected connections go (the port, and the
    /// address of each family the node has); `table_size`: slots
    /// per kernel-mode service; `healthy`: whether an endpoint address
    /// passes its active checks (kernel-mode tables hold only healthy
    /// endpoints of the best live priority, by weight).
    pub fn build(
        state: &State,
        frontends: &[Frontend],
        cookies: &[u64],
        proxy: (Addresses, u16),
        table_size: u32,
        healthy: &dyn Fn(SocketAddr) -> bool,
    ) -> Self {
        let (ips, port) = proxy;
        let wl = WorkloadValue {
            proxy_ip6: ips.v6().map_or(Ip::default(), |v6| IpAddr::V6(v6).into()),
            proxy_ip4_be: ips.v4().map_or(0, |v4| u32::from(v4).to_be()),
            proxy_port_be: port.to_be(),
            flags: 0,
        };
        let workloads = cookies.iter().map(|c| (*c, wl)).collect();
        let services =
            frontends.iter().map(|f| (service_key(f.vip, f.port.0), desired(state, f, table_size, healthy))).collect();
        Self { workloads, services }
    }

    /// Brings the contents of the state before `delta` to `state`, the
    /// state after it, entry by entry; returns the `SERVICES` keys it
    /// changed (to sync with [`super::Datapath::sync_keys`]).
    pub fn update(
        &mut self,
        state: &State,
        delta: &Delta,
        table_size: u32,
        healthy: &dyn Fn(SocketAddr) -> bool,
    ) -> BTreeSet<ServiceKey> {
        let mut keys = BTreeSet::new();
        for s in &delta.before {
            for p in &s.ports {
                for vip in s.vips.iter() {
                    let k = service_key(vip, p.port.0);
                    self.services.remove(&k);
                    keys.insert(k);
                }
            }
        }
        keys.extend(self.refresh(state, delta.changed.iter(), table_size, healthy));
        keys
    }

    /// Makes the entries of `frontends` (of `state`) again, with the
    /// health seen now; returns their keys.
    pub fn refresh<'a>(
        &mut self,
        state: &State,
        frontends: impl Iterator<Item = &'a Frontend>,
        table_size: u32,
        healthy: &dyn Fn(SocketAddr) -> bool,
    ) -> BTreeSet<ServiceKey> {
        let mut keys = BTreeSet::new();
        for f in frontends {
            let k = service_key(f.vip, f.port.0);
            self.services.insert(k, desired(state, f, table_size, healthy));
            keys.insert(k);
        }
        keys
    }
}

/// The `SERVICES` entry of frontend `f` of `state`: a kernel-mode table
/// holds the endpoints of the frontend's family.
fn desired(state: &State, f: &Frontend, table_size: u32, healthy: &dyn Fn(SocketAddr) -> bool) -> DesiredService {
    let s = &state.services[f.service];
    match s.mode {
        Mode::Proxy => DesiredService { id: f.id, mode: MODE_PROXY, slots: Vec::new() },
        Mode::Kernel => {
            let endpoints: Vec<&Endpoint> = s.endpoints_of(f.family()).map(|(_, e)| e).collect();
            let weights = balance::effective_weights(&endpoints, s.fail_open, |e| Candidate {
                weight: e.weight.0,
                priority: e.priority,
                available: healthy(e.addr(f.target_port)),
            });
            let slots = slots::layout(&weights, table_size)
                .into_iter()
                .map(|i| SockAddr::from(endpoints[i].addr(f.target_port)))
                .collect();
            DesiredService { id: f.id, mode: MODE_KERNEL, slots }
        }
    }
}

impl MapContents {
    /// Makes the contents fit `cap`: kernel-mode tables that would overflow
    /// `SLOTS` (with room to rewrite the largest) become proxy-mode entries, so
    /// their connections still reach an endpoint, through the proxy;
    /// service and workload entries past their maps are left out. Returns
    /// how many service ports left kernel mode.
    pub fn fit(&mut self, cap: &MapCapacity) -> usize {
        while self.workloads.len() > cap.workloads {
            self.workloads.pop_last();
        }
        while self.services.len() > cap.services {
            self.services.pop_last();
        }
        let (mut used, mut moved) = (0, 0);
        let room = self.services.values().filter(|d| d.mode == MODE_KERNEL).map(|d| d.slots.len()).max().unwrap_or(0);
        for d in self.services.values_mut().filter(|d| d.mode == MODE_KERNEL) {
            let need = d.slots.len();
            if used + need + room <= cap.slots {
                used += need;
            } else {
                *d = DesiredService { id: d.id, mode: MODE_PROXY, slots: Vec::new() };
                moved += 1;
            }
        }
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{parse_document, ServiceIds, State};

    fn sockaddr(s: &str) -> SockAddr {
        SockAddr::from(s.parse::<SocketAddr>().unwrap())
    }

    fn proxy() -> (Addresses, u16) {
        (Addresses::one("172.18.0.2".parse().unwrap()), 15001)
    }

    /// A dual-stack service has an entry per VIP and port, each with the
    /// id of its own frontend and a table of its family's endpoints; the
    /// workloads' entry has the proxy's address of each family.
    #[test]
    fn a_dual_stack_service_has_one_entry_and_table_per_family() {
        let doc = parse_document(
            "nodes: [{name: a, addresses: [172.18.0.2, 'fd00:18::2']}]\n\
             services:\n - {name: db, vips: [10.96.0.20, 'fd00:96::20'], mode: kernel, ports: [{port: 5432}], endpoints: [{ip: 10.0.0.1, node: a, weight: 3}, {ip: 'fd00:44::1', node: a, weight: 2}, {ip: 'fd00:44::2', node: a}]}\n",
        )
        .unwrap();
        let state = State::from_document(&doc).unwrap();
        let ids = ServiceIds::default().assign(&state.frontend_keys());
        let f = state.frontends(&ids);
        assert_eq!(f.len(), 2);
        let mut both = Addresses::one("172.18.0.2".parse().unwrap());
        both.set("fd00:18::2".parse().unwrap());
        let c = MapContents::build(&state, &f, &[7], (both, 15001), 256, &|_| true);
        let w = c.workloads[&7];
        assert_eq!(IpAddr::from(w.proxy_ip6), "fd00:18::2".parse::<IpAddr>().unwrap());
        assert_eq!(w.proxy_ip4_be, u32::from_be_bytes([172, 18, 0, 2]).to_be());
        let v4 = &c.services[&service_key("10.96.0.20".parse().unwrap(), 5432)];
        let v6 = &c.services[&service_key("fd00:96::20".parse().unwrap(), 5432)];
        assert_eq!(v4.id, ids.get("default/db:5432").unwrap());
        assert_eq!(v6.id, ids.get("default/db:5432@ipv6").unwrap());
        assert_ne!(v4.id, v6.id);
        assert_eq!(v4.slots, [sockaddr("10.0.0.1:5432")], "IPv4 endpoints only");
        assert_eq!(v6.slots.len(), 3, "2:1 in three slots");
        let six = |s: &str| v6.slots.iter().filter(|x| **x == sockaddr(s)).count();
        assert_eq!((six("[fd00:44::1]:5432"), six("[fd00:44::2]:5432")), (2, 1));
    }

    #[test]
    fn one_entry_per_service_port_with_slots_for_kernel_mode() {
        let doc = parse_document(
            "nodes: [{name: a, address: 172.18.0.2}]\n\
             services:\n - {name: web, vip: 10.96.0.10, ports: [{port: 80}, {port: 443}]}\n\
             \x20- {name: db, vip: 10.96.0.20, mode: kernel, ports: [{port: 5432, targetPort: 5433}], endpoints: [{ip: 10.0.0.1, node: a, weight: 3}, {ip: 10.0.0.2, node: a, weight: 2}]}\n",
        )
        .unwrap();
        let state = State::from_document(&doc).unwrap();
        let ids = ServiceIds::default().assign(&state.frontend_keys());
        let f = state.frontends(&ids);
        let c = MapContents::build(&state, &f, &[7, 9], proxy(), 256, &|_| true);
        assert_eq!(c.workloads.len(), 2);
        assert_eq!(c.workloads[&7].proxy_port_be, 15001u16.to_be());
        assert_eq!(c.workloads[&7].proxy_ip4_be, u32::from_be_bytes([172, 18, 0, 2]).to_be());
        assert!(c.workloads[&7].proxy_ip6.is_unspecified(), "no IPv6 address: none");
        assert_eq!(c.services.len(), 3);
        let web = &c.services[&service_key("10.96.0.10".parse().unwrap(), 443)];
        assert_eq!((web.mode, web.slots.len()), (MODE_PROXY, 0));
        assert_eq!(web.id, ids.get("default/web:443").unwrap());
        let db = &c.services[&service_key("10.96.0.20".parse().unwrap(), 5432)];
        assert_eq!(db.mode, MODE_KERNEL);
        assert_eq!(db.slots.len(), 5, "3:2 is exact in five slots");
        let first = sockaddr("10.0.0.1:5433");
        assert_eq!(db.slots.iter().filter(|s| **s == first).count(), 3);

        // An unhealthy endpoint leaves the table; none healthy fails open.
        let down = sockaddr("10.0.0.1:5433");
        let c = MapContents::build(&state, &f, &[], proxy(), 256, &|a| SockAddr::from(a) != down);
        let db = &c.services[&service_key("10.96.0.20".parse().unwrap(), 5432)];
        assert_eq!(db.slots.len(), 1);
        assert!(db.slots.iter().all(|s| *s != down));
        let c = MapContents::build(&state, &f, &[], proxy(), 256, &|_| false);
        assert_eq!(c.services[&service_key("10.96.0.20".parse().unwrap(), 5432)].slots.len(), 5, "fail open");
    }

    #[test]
    fn tables_that_do_not_fit_are_served_by_the_proxy() {
        let slots = |n: usize| DesiredService { id: 0, mode: MODE_KERNEL, slots: vec![sockaddr("10.0.0.1:80"); n] };
        let mut c = MapContents::default();
        for i in 0..3u32 {
            c.services.insert(
                service_key(std::net::Ipv4Addr::from(0x0a60_0001 + i).into(), 80),
                DesiredService { id: i + 1, ..slots(256) },
            );
        }
        let cap = MapCapacity { slots: 3 * 256, ..MapCapacity::default() };
        assert_eq!(c.fit(&cap), 1, "two tables and room to rewrite one fit, the third does not");
        let modes: Vec<u8> = c.services.values().map(|d| d.mode).collect();
        assert_eq!(modes, [MODE_KERNEL, MODE_KERNEL, MODE_PROXY]);
        assert!(c.services.values().last().unwrap().slots.is_empty());
        assert_eq!(c.services.values().last().unwrap().id, 3, "the proxy still knows the service by its id");
        assert_eq!(c.fit(&cap), 0, "fitting contents are left as they are");
    }

    /// Updating the contents by a write's delta gives what building them
    /// from the new state gives.
    #[test]
    fn an_update_by_delta_equals_a_build() {
        use crate::model::{Delta, Index};
        let doc = parse_document(
            "nodes: [{name: a, address: 172.18.0.2}]\n\
             services:\n - {name: web, vip: 10.96.0.10, ports: [{port: 80}, {port: 443}]}\n\
             \x20- {name: db, vip: 10.96.0.20, mode: kernel, ports: [{port: 5432}], endpoints: [{ip: 10.0.0.1, node: a, weight: 3}, {ip: 10.0.0.2, node: a, weight: 2}]}\n\
             \x20- {name: kv, vip: 10.96.0.30, mode: kernel, ports: [{port: 6379}], endpoints: [{ip: 10.0.0.3, node: a}]}\n",
        )
        .unwrap();
        let proxy = proxy();
        let state = State::from_document(&doc).unwrap();
        let ids = ServiceIds::default().assign(&state.frontend_keys());
        let frontends = state.frontends(&ids);
        type Edit = Box<dyn Fn(&mut crate::model::Document)>;
        let edits: Vec<Edit> = vec![
            Box::new(|d| d.service_mut(1).endpoints[0].weight = 1),
            Box::new(|d| d.service_mut(1).mode = "proxy".into()),
            Box::new(|d| drop(d.services.remove(2))),
            Box::new(|d| d.service_mut(2).vip = "10.96.0.40".into()),
            Box::new(|d| drop(d.service_mut(0).ports.pop())),
        ];
        for (n, edit) in edits.iter().enumerate() {
            let mut next_doc = doc.clone();
            edit(&mut next_doc);
            let index = Index::of(&state, 256);
            let v = State::from_changes((&doc, &state, &index), &next_doc, 256).unwrap();
            let next_ids = ids.assign(&v.state.frontend_keys());
            let next_frontends = v.state.frontends(&next_ids);
            let same = next_frontends == frontends;
            let delta = Delta::of(&v.changes, &frontends, &next_frontends, same, &v.state).unwrap();
            let mut c = MapContents::build(&state, &frontends, &[7], proxy, 256, &|_| true);
            let keys = c.update(&v.state, &delta, 256, &|_| true);
            assert!(!keys.is_empty(), "edit {n}");
            let built = MapContents::build(&v.state, &next_frontends, &[7], proxy, 256, &|_| true);
            assert_eq!(c, built, "edit {n}");
        }
    }
}
