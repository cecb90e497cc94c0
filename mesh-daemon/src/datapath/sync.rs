//! Keeping the maps equal to the desired contents, touching only what
//! differs; what goes away goes first.

use super::*;

/// What a sync changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SyncReport {
    pub written: usize,
    pub deleted: usize,
}

impl Datapath {
    /// Makes `WORKLOADS`, `SERVICES` and `SLOTS` equal to `want`, touching
    /// only the entries that differ. A changed slot table is written to the
    /// inactive generation, then the service entry flips to it in one
    /// update, so a connect never sees a half-written table.
    pub fn sync(&mut self, want: &MapContents) -> Result<SyncReport, DatapathError> {
        let mut report = SyncReport::default();
        let err = |name| move |source| DatapathError::Map { name, source };
        sync_map(&mut self.workloads, map_names::WORKLOADS, &want.workloads, &mut report)?;

        // What goes away goes first, so the maps never hold old and new
        // together beyond what planning counted.
        let stale: Vec<ServiceKey> = self
            .services
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(err(map_names::SERVICES))?
            .into_iter()
            .filter(|k| !want.services.contains_key(k))
            .collect();
        for k in stale {
            self.services.remove(&k).map_err(err(map_names::SERVICES))?;
            report.deleted += 1;
        }
        for (key, d) in want.services.iter().filter(|(_, d)| d.mode != MODE_KERNEL) {
            let value = ServiceValue { id: d.id, mode: d.mode, generation: 0, _pad: 0, slot_count: 0, _pad2: 0 };
            if self.services.get(key, 0).ok() != Some(value) {
                self.services.insert(key, value, 0).map_err(err(map_names::SERVICES))?;
                report.written += 1;
            }
        }
        // Slots of services that are gone or no longer in kernel mode; only
        // after their service entries are gone or switched.
        let kernel_ids: BTreeSet<u32> =
            want.services.values().filter(|d| d.mode == MODE_KERNEL).map(|d| d.id).collect();
        let mut slot_keys: Vec<SlotKey> = self.slots.keys().collect::<Result<_, _>>().map_err(err(map_names::SLOTS))?;
        for k in slot_keys.iter().filter(|k| !kernel_ids.contains(&k.service_id)) {
            self.slots.remove(k).map_err(err(map_names::SLOTS))?;
            report.deleted += 1;
        }
        slot_keys.retain(|k| kernel_ids.contains(&k.service_id));

        for (key, d) in want.services.iter().filter(|(_, d)| d.mode == MODE_KERNEL) {
            let have = self.services.get(key, 0).ok();
            let current = have.filter(|h| h.id == d.id && h.mode == MODE_KERNEL);
            let unchanged = current.is_some_and(|h| {
                h.slot_count as usize == d.slots.len()
                    && d.slots.iter().enumerate().all(|(i, b)| {
                        let k = SlotKey { service_id: d.id, generation: u32::from(h.generation), slot: i as u32 };
                        self.slots.get(&k, 0).ok().as_ref() == Some(b)
                    })
            });
            if unchanged {
                continue;
            }
            let generation = current.map_or(0, |h| h.generation ^ 1);
            // The inactive generation's entries past the new table go first.
            for k in slot_keys.iter().filter(|k| {
                k.service_id == d.id && k.generation == u32::from(generation) && k.slot as usize >= d.slots.len()
            }) {
                self.slots.remove(k).map_err(err(map_names::SLOTS))?;
                report.deleted += 1;
            }
            for (i, b) in d.slots.iter().enumerate() {
                let k = SlotKey { service_id: d.id, generation: u32::from(generation), slot: i as u32 };
                self.slots.insert(k, b, 0).map_err(err(map_names::SLOTS))?;
                report.written += 1;
            }
            let value = ServiceValue {
                id: d.id,
                mode: MODE_KERNEL,
                generation,
                _pad: 0,
                slot_count: d.slots.len() as u32,
                _pad2: 0,
            };
            self.services.insert(key, value, 0).map_err(err(map_names::SERVICES))?;
            report.written += 1;
        }
        debug!(written = report.written, deleted = report.deleted, "maps synced");
        Ok(report)
    }
}

fn sync_map<K, V>(
    map: &mut BpfHashMap<MapData, K, V>,
    name: &'static str,
    want: &BTreeMap<K, V>,
    report: &mut SyncReport,
) -> Result<(), DatapathError>
where
    K: aya::Pod + Ord,
    V: aya::Pod + PartialEq,
{
    let err = |source| DatapathError::Map { name, source };
    let have: Vec<K> = map.keys().collect::<Result<_, _>>().map_err(err)?;
    for k in have.iter().filter(|k| !want.contains_key(k)) {
        map.remove(k).map_err(err)?;
        report.deleted += 1;
    }
    for (k, v) in want {
        if map.get(k, 0).ok().as_ref() != Some(v) {
            map.insert(k, v, 0).map_err(err)?;
            report.written += 1;
        }
    }
    Ok(())
}
