//! Keeping the kernel maps equal to the accepted state: what they should
//! hold, the sync (whole or by a write's delta), the rollback of a failed
//! write, and the re-sync of slot tables when an endpoint's health changes.

use super::*;
use crate::model::{Addresses, Family};

impl Control {
    /// What the kernel maps hold.
    pub(super) fn capacity(&self) -> MapCapacity {
        MapCapacity {
            slots: self.slot_capacity.load(Ordering::Relaxed),
            ..MapCapacity::with_table_size(self.cfg.slot_table_size)
        }
    }

    /// The map contents for `current`, with the health seen now; kernel-mode
    /// tables that do not fit the maps (only a restored state can have
    /// them: writes are checked) are left to the proxy.
    pub(super) fn contents(&self, current: &Current) -> MapContents {
        let (state, frontends) = (&current.state, &current.frontends);
        let registry = &self.registry;
        let proxy = (self.proxy_addresses(state), self.cfg.proxy_listen.first().map_or(0, |l| l.port()));
        let mut contents =
            MapContents::build(state, frontends, &current.cookies, proxy, self.cfg.slot_table_size, &|a| {
                registry.actively_healthy(a)
            });
        let moved = contents.fit(&self.capacity());
        if moved > 0 {
            warn!(service_ports = moved, "kernel-mode service ports that do not fit map SLOTS are served by the proxy");
        }
        contents
    }

    /// Where pods reach the proxy's outbound listeners, per family: a
    /// listener's own address, or for one on the unspecified address, the
    /// node's address of that family.
    fn proxy_addresses(&self, state: &State) -> Addresses {
        let node = state.node(&self.cfg.node).map(|n| n.addresses).unwrap_or_default();
        let mut out = Addresses::default();
        for l in &self.cfg.proxy_listen {
            let ip = match l.ip().is_unspecified() {
                true => node.get(Family::of(l.ip())),
                false => Some(l.ip()),
            };
            if let Some(ip) = ip {
                out.set(ip);
            }
        }
        out
    }

    /// Syncs the maps to `current`. With `cached` (what the maps were
    /// last synced to, and what changed since), `edit` brings those
    /// contents up to date entry by entry and returns the keys it touched,
    /// and only those are synced; without, every entry is. Returns the
    /// contents the maps were synced to.
    pub(super) fn sync_to<C>(
        &self,
        dp: &mut Datapath,
        current: &Current,
        cached: Option<(MapContents, C)>,
        edit: impl FnOnce(&mut MapContents, C, &dyn Fn(SocketAddr) -> bool) -> BTreeSet<mesh_common::ServiceKey>,
    ) -> (MapContents, Result<datapath::SyncReport, DatapathError>) {
        match cached {
            Some((mut want, change)) => {
                let registry = &self.registry;
                let keys = edit(&mut want, change, &|a| registry.actively_healthy(a));
                let t0 = tokio::time::Instant::now();
                let r = dp.sync_keys(&want, &keys);
                self.series.map_sync.observe(t0.elapsed().as_secs_f64());
                (want, r)
            }
            None => {
                let want = self.contents(current);
                let r = self.timed_sync(dp, &want);
                (want, r)
            }
        }
    }

    pub(super) fn timed_sync(
        &self,
        dp: &mut Datapath,
        contents: &MapContents,
    ) -> Result<datapath::SyncReport, DatapathError> {
        let t0 = tokio::time::Instant::now();
        let r = dp.sync(contents);
        self.series.map_sync.observe(t0.elapsed().as_secs_f64());
        r
    }

    /// Puts the maps back to `current` after a failed write.
    pub(super) fn roll_back(&self, dp: &mut Datapath, current: &Current) -> Rollback {
        let generation = current.stored.generation;
        match self.timed_sync(dp, &self.contents(current)) {
            Ok(_) => Rollback::Done { generation },
            Err(error) => {
                let why = format!("the kernel maps could not be put back as generation {generation}: {error}");
                tracing::error!(reason = %why, "not ready");
                self.problem.store(Some(Arc::new(why)));
                Rollback::Failed { generation, error }
            }
        }
    }

    /// Re-syncs the kernel maps after the health of `changed` changed:
    /// only the slot tables with those endpoints, when the maps hold the
    /// state as last synced; all of them otherwise.
    pub fn resync(&self, changed: &[SocketAddr]) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let Inner { current, datapath, synced } = &mut *inner;
        let Some(dp) = datapath.as_mut() else { return };
        let cached = synced.take().filter(|_| self.problem.load().is_none()).map(|want| (want, changed));
        let (want, r) = self.sync_to(dp, current, cached, |want, changed, healthy| {
            let by_addr = current.kernel_by_addr();
            let touched: BTreeSet<usize> = changed.iter().filter_map(|a| by_addr.get(a)).flatten().copied().collect();
            let fronts = touched.iter().map(|k| &current.frontends[*k]);
            want.refresh(&current.state, fronts, self.cfg.slot_table_size, healthy)
        });
        match r {
            Ok(r) => {
                debug!(written = r.written, deleted = r.deleted, "maps re-synced after a health change");
                *synced = Some(want);
            }
            Err(e) => warn!(error = %e, "re-syncing the maps after a health change failed"),
        }
    }
}
