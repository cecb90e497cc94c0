//! What the control plane publishes: every accepted state as an immutable
//! snapshot, and the readers that derive their own views from it.

use super::{Frontend, State};
use crate::telemetry::metrics::StatsRow;

/// One accepted state, validated, with the service ports the kernel knows
/// by id. Never changed once published.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub generation: u64,
    /// Shared with the control plane's copy: publishing clones no state.
    pub state: std::sync::Arc<State>,
    pub frontends: std::sync::Arc<Vec<Frontend>>,
}

/// A reader of the state: the proxy's routes, the tunnel's inbound checks,
/// the health checks. Each derives what it needs from a snapshot, in
/// `update`, which runs before the write that made the snapshot is
/// answered, so a caller that got its answer sees its write everywhere.
pub trait View: Send + Sync + 'static {
    fn update(&self, snapshot: &Snapshot);
    /// `meshctl stats` rows of the series this view counts into.
    fn stats_rows(&self) -> Vec<StatsRow> {
        Vec::new()
    }
}
