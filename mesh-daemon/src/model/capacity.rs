//! What a state needs in each kernel map, checked against what the maps
//! hold before anything is saved or written: a state that does not fit is
//! refused whole at planning, never half-applied.

use mesh_common::{limits, map_names};

use super::{FieldError, Mode, NodeName, State, ValidationErrors};

/// The daemon's `--slot-table-size` when not given.
pub const DEFAULT_SLOT_TABLE_SIZE: u32 = 256;
/// The daemon's `--slot-entries` when not given: `SLOTS` as the kernel
/// programs declare it.
pub const DEFAULT_SLOT_ENTRIES: u32 = limits::MAX_SLOTS;

/// Entries the kernel maps hold, and the most slots a kernel-mode table
/// gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapCapacity {
    pub workloads: usize,
    pub services: usize,
    /// `SLOTS` as loaded (`--slot-entries`, or the size it was pinned with).
    pub slots: usize,
    /// `--slot-table-size`.
    pub slot_table_size: u32,
}

impl MapCapacity {
    /// The maps as the kernel programs declare them.
    pub fn with_table_size(slot_table_size: u32) -> Self {
        Self {
            workloads: limits::MAX_WORKLOADS as usize,
            services: limits::MAX_SERVICES as usize,
            slots: limits::MAX_SLOTS as usize,
            slot_table_size,
        }
    }
}

impl Default for MapCapacity {
    fn default() -> Self {
        Self::with_table_size(DEFAULT_SLOT_TABLE_SIZE)
    }
}

/// Entries one state needs on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MapNeeds {
    /// This node's workloads.
    pub workloads: usize,
    /// One per frontend: service port and VIP (two per port for a
    /// dual-stack service).
    pub services: usize,
    /// Every kernel-mode table at its largest, plus the largest once more:
    /// a changed table is written beside the one in use, then the old one
    /// goes (see `datapath::sync`).
    pub slots: usize,
}

/// The largest slot table of each of a kernel-mode service's VIPs (per
/// port): one per family, over that family's endpoints.
pub(super) fn table_bounds(s: &super::Service, slot_table_size: u32) -> impl Iterator<Item = usize> + '_ {
    s.vips.families().map(move |f| {
        let weights: Vec<u16> = s.endpoints_of(f).map(|(_, e)| e.weight.0).collect();
        super::slots::table_bound(&weights, slot_table_size)
    })
}

impl MapNeeds {
    pub fn of(state: &State, node: &NodeName, slot_table_size: u32) -> Self {
        let workloads = state.workloads.iter().filter(|w| &w.node == node).count();
        let services = state.services.iter().map(|s| s.ports.len() * s.vips.len()).sum();
        let (mut slots, mut largest) = (0, 0);
        for s in state.services.iter().filter(|s| s.mode == Mode::Kernel) {
            for bound in table_bounds(s, slot_table_size) {
                slots += s.ports.len() * bound;
                largest = largest.max(bound);
            }
        }
        Self { workloads, services, slots: slots + largest }
    }

    /// What the state that `index` describes needs after `change` (see
    /// [`super::Index`]), with `workloads` of this node: a write counts
    /// only the services it changes.
    pub fn after(index: &super::Index, change: &super::Index, workloads: usize) -> Self {
        let largest = index.largest_with(change);
        Self {
            workloads,
            services: (index.ports + change.ports).max(0) as usize,
            slots: (index.slots + change.slots).max(0) as usize + largest,
        }
    }

    /// Every map this state overflows, each naming what would fix it.
    pub fn check(&self, cap: &MapCapacity) -> Result<(), ValidationErrors> {
        let mut errors = Vec::new();
        if self.workloads > cap.workloads {
            errors.push(FieldError {
                path: "workloads".into(),
                message: format!(
                    "map {}: this node's {} workloads need {} entries, but the map holds {}; spread the pods over more nodes",
                    map_names::WORKLOADS,
                    self.workloads,
                    self.workloads,
                    cap.workloads
                ),
            });
        }
        if self.services > cap.services {
            errors.push(FieldError {
                path: "services".into(),
                message: format!(
                    "map {}: {} service ports need {} entries, but the map holds {}; remove services or ports",
                    map_names::SERVICES,
                    self.services,
                    self.services,
                    cap.services
                ),
            });
        }
        if self.slots > cap.slots {
            errors.push(FieldError {
                path: "services".into(),
                message: format!(
                    "map {}: the kernel-mode services need {} entries (a table per port, sized by its weights up to --slot-table-size {}, plus room to rewrite the largest), but the map holds {} (--slot-entries); start the daemon with a larger --slot-entries, lower --slot-table-size, or move services to mode: proxy",
                    map_names::SLOTS,
                    self.slots,
                    cap.slot_table_size,
                    cap.slots
                ),
            });
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(errors))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_document;
    use std::sync::Arc;

    fn state(kernel_services: usize, endpoints: usize) -> State {
        let mut text = String::from("nodes: [{name: a, address: 172.18.0.2}]\nservices:\n");
        for i in 0..kernel_services {
            let eps: Vec<String> =
                (0..endpoints).map(|j| format!("{{ip: 10.244.{}.{}, node: a}}", i / 200, j + 1)).collect();
            text += &format!(
                " - {{name: s{i}, vip: 10.96.{}.{}, mode: kernel, ports: [{{port: 80}}], endpoints: [{}]}}\n",
                i / 250,
                i % 250 + 1,
                eps.join(", ")
            );
        }
        State::from_document(&parse_document(&text).unwrap()).unwrap()
    }

    fn node() -> NodeName {
        NodeName::parse("a").unwrap()
    }

    #[test]
    fn kernel_tables_count_their_weights_plus_the_largest_once_more() {
        // Ten endpoints of weight 1: ten slots each, one table in flight.
        let needs = MapNeeds::of(&state(3, 10), &node(), 256);
        assert_eq!(needs, MapNeeds { workloads: 0, services: 3, slots: 3 * 10 + 10 });
        assert!(needs.check(&MapCapacity::with_table_size(256)).is_ok());
        // 10 000 services x 10 endpoints fit the default map.
        assert_eq!(MapNeeds::of(&state(10_000, 10), &node(), 256).slots, 100_010);
    }

    #[test]
    fn an_overflowing_slot_map_is_refused_naming_the_map_the_numbers_and_the_flags() {
        let needs = MapNeeds::of(&state(520, 10), &node(), 256);
        assert_eq!(needs.slots, 5_210);
        let small = MapCapacity { slots: 5_000, ..MapCapacity::with_table_size(256) };
        let e = needs.check(&small).unwrap_err();
        assert_eq!(e.0.len(), 1, "{e}");
        let msg = e.to_string();
        assert!(msg.starts_with("services: map SLOTS: the kernel-mode services need 5210 entries"), "{msg}");
        assert!(msg.contains("holds 5000 (--slot-entries)") && msg.contains("larger --slot-entries"), "{msg}");
    }

    #[test]
    fn services_and_workloads_over_their_maps_are_refused() {
        let small = MapCapacity { workloads: 1, services: 2, slots: 1 << 20, slot_table_size: 256 };
        let e = MapNeeds { workloads: 2, services: 3, slots: 0 }.check(&small).unwrap_err().to_string();
        assert!(
            e.contains("workloads: map WORKLOADS: this node's 2 workloads need 2 entries, but the map holds 1"),
            "{e}"
        );
        assert!(e.contains("services: map SERVICES: 3 service ports need 3 entries, but the map holds 2"), "{e}");
    }

    /// A dual-stack kernel-mode port is two `SERVICES` entries and two
    /// tables, each over its family's endpoints; the index a write is
    /// checked against counts the same.
    #[test]
    fn a_dual_stack_port_needs_an_entry_and_a_table_per_family() {
        let text = "nodes: [{name: a, addresses: [172.18.0.2, 'fd00::2']}]\nservices:\n \
                    - {name: s, vips: [10.96.0.1, 'fd00:96::1'], mode: kernel, ports: [{port: 80}, {port: 443}], \
                    endpoints: [{ip: 10.0.0.1, node: a}, {ip: 10.0.0.2, node: a}, {ip: 10.0.0.3, node: a}, \
                    {ip: 'fd00::11', node: a}, {ip: 'fd00::12', node: a}]}\n";
        let state = State::from_document(&parse_document(text).unwrap()).unwrap();
        let needs = MapNeeds::of(&state, &node(), 256);
        // Two ports by two VIPs; per port a table of 3 and one of 2, and
        // the largest (3) once more.
        assert_eq!(needs, MapNeeds { workloads: 0, services: 4, slots: 2 * (3 + 2) + 3 });
        let index = crate::model::Index::of(&state, 256);
        assert_eq!(MapNeeds::after(&index, &crate::model::Index::default(), 0), needs);
    }

    #[test]
    fn proxy_mode_and_drained_services_need_no_slots() {
        let mut s = state(2, 3);
        Arc::make_mut(&mut s.services[0]).mode = Mode::Proxy;
        for e in &mut Arc::make_mut(&mut s.services[1]).endpoints {
            e.weight = crate::model::Weight(0);
        }
        assert_eq!(MapNeeds::of(&s, &node(), 256).slots, 0);
    }
}
