//! What the control plane publishes: every accepted state as an immutable
//! snapshot, and the readers that derive their own views from it.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use super::{Changes, Frontend, Service, State};

/// One accepted state, validated, with the service ports the kernel knows
/// by id. Never changed once published.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub generation: u64,
    /// Shared with the control plane's copy: publishing clones no state.
    pub state: Arc<State>,
    pub frontends: Arc<Vec<Frontend>>,
    /// What changed since the snapshot of `generation - 1`; None: rebuild
    /// from the state.
    pub delta: Option<Arc<Delta>>,
}

/// What one write changed, for readers that update their view in place.
#[derive(Debug, Default)]
pub struct Delta {
    /// The frontends that are new or whose service changed.
    pub changed: Vec<Frontend>,
    /// Ids of the frontends that are gone.
    pub removed: Vec<u32>,
    /// The services before the write of the changed or removed ones.
    pub before: Vec<Arc<Service>>,
    /// Endpoint addresses no service uses any more.
    pub gone: Vec<SocketAddr>,
}

impl Delta {
    /// The delta of a write that made `changes` and turned the frontends
    /// `before` into `after` (of `state`; `same`: the same list, every
    /// service port where it was); None when it changed everything.
    /// `gone` is left to the caller, who knows the addresses in use.
    pub fn of(changes: &Changes, before: &[Frontend], after: &[Frontend], same: bool, state: &State) -> Option<Self> {
        if changes.whole {
            return None;
        }
        let (changed, removed) = if same {
            // `after` is sorted by (namespace, name, port): each changed
            // service's ports are found by search, not by a walk of all.
            let mut changed = Vec::new();
            for &i in &changes.changed {
                let s = &state.services[i];
                let key = |f: &Frontend| {
                    let o = &state.services[f.service];
                    (o.namespace.as_str(), o.name.as_str())
                };
                let at = after.partition_point(|f| key(f) < (s.namespace.as_str(), s.name.as_str()));
                changed.extend(after[at..].iter().take_while(|f| f.service == i).cloned());
            }
            (changed, Vec::new())
        } else {
            let mut touched = vec![false; state.services.len()];
            for &i in &changes.changed {
                touched[i] = true;
            }
            let old: HashSet<u32> = before.iter().map(|f| f.id).collect();
            let new: HashSet<u32> = after.iter().map(|f| f.id).collect();
            (
                after.iter().filter(|f| touched[f.service] || !old.contains(&f.id)).cloned().collect(),
                before.iter().filter(|f| !new.contains(&f.id)).map(|f| f.id).collect(),
            )
        };
        let before = changes.removed.iter().map(|(_, s)| s.clone()).collect();
        Some(Delta { changed, removed, before, gone: Vec::new() })
    }
}

/// A reader of the state: the proxy's routes, the tunnel's inbound checks,
/// the health checks. Each derives what it needs from a snapshot, in
/// `update`, which runs before the write that made the snapshot is
/// answered, so a caller that got its answer sees its write everywhere.
pub trait View: Send + Sync + 'static {
    fn update(&self, snapshot: &Snapshot);
}
