//! Keeping the maps equal to the desired contents, touching only what
//! differs; what goes away goes first.
//!
//! The daemon keeps a copy of what it last wrote ([`Mirror`]), so a sync
//! compares in memory and makes a system call only per entry that
//! changes: one endpoint's change costs its own entries, not a read of
//! every map. The copy is read from the kernel once at start, and again
//! after a sync failed midway (it may then differ from the kernel).
//!
//! A kernel-mode table is changed by writing the new one beside it (the
//! other generation), flipping the service entry to it in one update (a
//! connect never sees a half-written table), then deleting the old one.
//! So `SLOTS` holds one table per service plus, for a moment, a second
//! one; tables that shrink are rewritten before those that grow, which
//! keeps the peak within what planning counted (every table at its
//! largest plus the largest once more).

use super::*;

/// What a sync changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SyncReport {
    pub written: usize,
    pub deleted: usize,
}

/// What the maps hold, as last written or read.
#[derive(Debug, Default)]
pub(super) struct Mirror {
    workloads: BTreeMap<u64, WorkloadValue>,
    services: BTreeMap<ServiceKey, ServiceValue>,
    /// `SLOTS` by (service id, generation): the backends of slots 0..n.
    tables: BTreeMap<(u32, u32), Vec<SockAddr>>,
    /// `SLOTS` entries that are not part of a whole table (left by a
    /// failure): deleted by the next sync.
    stray: Vec<SlotKey>,
}

impl Mirror {
    /// Reads what the maps hold.
    fn read(dp: &Datapath) -> Result<Self, DatapathError> {
        let err = |name| move |source| DatapathError::Map { name, source };
        let mut m = Mirror::default();
        for e in dp.workloads.iter() {
            let (k, v) = e.map_err(err(map_names::WORKLOADS))?;
            m.workloads.insert(k, v);
        }
        for e in dp.services.iter() {
            let (k, v) = e.map_err(err(map_names::SERVICES))?;
            m.services.insert(k, v);
        }
        let mut by_table: BTreeMap<(u32, u32), BTreeMap<u32, SockAddr>> = BTreeMap::new();
        for e in dp.slots.iter() {
            let (k, v) = e.map_err(err(map_names::SLOTS))?;
            by_table.entry((k.service_id, k.generation)).or_default().insert(k.slot, v);
        }
        for ((id, generation), slots) in by_table {
            let whole = slots.keys().enumerate().all(|(i, s)| i as u32 == *s);
            if whole {
                m.tables.insert((id, generation), slots.into_values().collect());
            } else {
                m.stray.extend(slots.keys().map(|slot| SlotKey { service_id: id, generation, slot: *slot }));
            }
        }
        Ok(m)
    }
}

/// Writes `want` over `have` in `map`, keeping `have` equal to what it holds.
fn sync_map<K, V>(
    map: &mut BpfHashMap<MapData, K, V>,
    name: &'static str,
    have: &mut BTreeMap<K, V>,
    want: &BTreeMap<K, V>,
    report: &mut SyncReport,
) -> Result<(), DatapathError>
where
    K: aya::Pod + Ord,
    V: aya::Pod + PartialEq,
{
    let err = |source| DatapathError::Map { name, source };
    let gone: Vec<K> = have.keys().filter(|k| !want.contains_key(k)).copied().collect();
    for k in gone {
        map.remove(&k).map_err(err)?;
        have.remove(&k);
        report.deleted += 1;
    }
    for (k, v) in want {
        if have.get(k) != Some(v) {
            map.insert(k, v, 0).map_err(err)?;
            have.insert(*k, *v);
            report.written += 1;
        }
    }
    Ok(())
}

impl Datapath {
    /// Makes `WORKLOADS`, `SERVICES` and `SLOTS` equal to `want`, touching
    /// only the entries that differ (see the module doc).
    pub fn sync(&mut self, want: &MapContents) -> Result<SyncReport, DatapathError> {
        self.sync_some(want, None)
    }

    /// Makes the `SERVICES` entries at `keys` (and their slot tables)
    /// equal to `want`'s, looking at nothing else: a write that changed
    /// these service ports costs what it changed. The rest of `want` must
    /// be what the maps hold.
    pub fn sync_keys(&mut self, want: &MapContents, keys: &BTreeSet<ServiceKey>) -> Result<SyncReport, DatapathError> {
        self.sync_some(want, Some(keys))
    }

    fn sync_some(
        &mut self,
        want: &MapContents,
        only: Option<&BTreeSet<ServiceKey>>,
    ) -> Result<SyncReport, DatapathError> {
        let mut mirror = match self.mirror.take() {
            Some(m) => m,
            None => Mirror::read(self)?,
        };
        // Entries left by a failure are found by a whole sync only.
        let only = only.filter(|_| mirror.stray.is_empty());
        let r = self.sync_from(&mut mirror, want, only);
        // After a failure the copy may differ from the kernel: read again.
        if r.is_ok() {
            self.mirror = Some(mirror);
        }
        r
    }

    fn sync_from(
        &mut self,
        m: &mut Mirror,
        want: &MapContents,
        only: Option<&BTreeSet<ServiceKey>>,
    ) -> Result<SyncReport, DatapathError> {
        let mut report = SyncReport::default();
        let err = |name| move |source| DatapathError::Map { name, source };
        if only.is_none() {
            sync_map(&mut self.workloads, map_names::WORKLOADS, &mut m.workloads, &want.workloads, &mut report)?;
        }
        // The service entries looked at, and those wanted of them.
        let looked: Vec<ServiceKey> = match only {
            Some(keys) => keys.iter().copied().collect(),
            None => {
                m.services.keys().chain(want.services.keys()).copied().collect::<BTreeSet<_>>().into_iter().collect()
            }
        };
        let wanted = || looked.iter().filter_map(|k| want.services.get(k).map(|d| (k, d)));

        // What goes away goes first, so the maps never hold old and new
        // together beyond what planning counted.
        let stale: Vec<ServiceKey> =
            looked.iter().filter(|k| m.services.contains_key(k) && !want.services.contains_key(k)).copied().collect();
        // Tables whose service entry goes or leaves kernel mode.
        let mut freed: Vec<(u32, u32)> = Vec::new();
        for k in stale {
            self.services.remove(&k).map_err(err(map_names::SERVICES))?;
            if let Some(v) = m.services.remove(&k).filter(|v| v.mode == MODE_KERNEL) {
                freed.push((v.id, u32::from(v.generation)));
            }
            report.deleted += 1;
        }
        for (key, d) in wanted().filter(|(_, d)| d.mode != MODE_KERNEL) {
            let value = ServiceValue { id: d.id, mode: d.mode, generation: 0, _pad: 0, slot_count: 0, _pad2: 0 };
            if m.services.get(key) != Some(&value) {
                self.services.insert(key, value, 0).map_err(err(map_names::SERVICES))?;
                if let Some(v) = m.services.insert(*key, value).filter(|v| v.mode == MODE_KERNEL) {
                    freed.push((v.id, u32::from(v.generation)));
                }
                report.written += 1;
            }
        }
        // Tables no service entry points to (services gone or no longer
        // in kernel mode, generations not in use) and stray entries go
        // next: only after their service entries are gone or switched.
        let unused: Vec<(u32, u32)> = match only {
            Some(_) => {
                let active = |t: &(u32, u32)| {
                    m.services.values().any(|v| v.mode == MODE_KERNEL && (v.id, u32::from(v.generation)) == *t)
                };
                // A freed table is another entry's only when a service
                // moved to another address; rare enough to look.
                freed.into_iter().filter(|t| m.tables.contains_key(t) && !active(t)).collect()
            }
            None => {
                let active: BTreeSet<(u32, u32)> = m
                    .services
                    .values()
                    .filter(|v| v.mode == MODE_KERNEL)
                    .map(|v| (v.id, u32::from(v.generation)))
                    .collect();
                for k in std::mem::take(&mut m.stray) {
                    self.slots.remove(&k).map_err(err(map_names::SLOTS))?;
                    report.deleted += 1;
                }
                m.tables.keys().filter(|t| !active.contains(t)).copied().collect()
            }
        };
        for t in unused {
            self.delete_table(m, t, &mut report)?;
        }

        // Changed tables, those that shrink first.
        let mut changed: Vec<(i64, &ServiceKey, &super::contents::DesiredService)> = Vec::new();
        for (key, d) in wanted().filter(|(_, d)| d.mode == MODE_KERNEL) {
            let current = m.services.get(key).filter(|h| h.id == d.id && h.mode == MODE_KERNEL);
            let table = current.and_then(|h| m.tables.get(&(h.id, u32::from(h.generation))));
            let have_len = table.map_or(0, Vec::len);
            if current.is_some_and(|h| h.slot_count as usize == d.slots.len()) && table == Some(&d.slots) {
                continue;
            }
            changed.push((d.slots.len() as i64 - have_len as i64, key, d));
        }
        changed.sort_by_key(|c| c.0);
        for (_, key, d) in changed {
            // The table in use at this address: this service's, or one of
            // another service that had the address before.
            let prior = m.services.get(key).copied().filter(|h| h.mode == MODE_KERNEL);
            let current = prior.filter(|h| h.id == d.id);
            let generation = current.map_or(0, |h| h.generation ^ 1);
            let next = (d.id, u32::from(generation));
            for (i, b) in d.slots.iter().enumerate() {
                let k = SlotKey { service_id: d.id, generation: next.1, slot: i as u32 };
                self.slots.insert(k, b, 0).map_err(err(map_names::SLOTS))?;
                report.written += 1;
            }
            m.tables.insert(next, d.slots.clone());
            let value = ServiceValue {
                id: d.id,
                mode: MODE_KERNEL,
                generation,
                _pad: 0,
                slot_count: d.slots.len() as u32,
                _pad2: 0,
            };
            self.services.insert(key, value, 0).map_err(err(map_names::SERVICES))?;
            m.services.insert(*key, value);
            report.written += 1;
            // The old table, now unused.
            if let Some(old) = prior.map(|h| (h.id, u32::from(h.generation))) {
                self.delete_table(m, old, &mut report)?;
            }
        }
        debug!(written = report.written, deleted = report.deleted, "maps synced");
        Ok(report)
    }

    fn delete_table(&mut self, m: &mut Mirror, t: (u32, u32), report: &mut SyncReport) -> Result<(), DatapathError> {
        let Some(table) = m.tables.remove(&t) else { return Ok(()) };
        for slot in 0..table.len() as u32 {
            let k = SlotKey { service_id: t.0, generation: t.1, slot };
            self.slots.remove(&k).map_err(|source| DatapathError::Map { name: map_names::SLOTS, source })?;
            report.deleted += 1;
        }
        Ok(())
    }
}
