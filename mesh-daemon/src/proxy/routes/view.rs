//! The proxy's reader of the state: each snapshot becomes a new route
//! table, swapped in whole; the pools and policies of what is gone are
//! dropped.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::{Local, RouteTable};
use crate::balance::Registry;
use crate::model::{PortKey, Snapshot, View};
use crate::proxy::http::policy::Policies;
use crate::proxy::http::upstream::Upstreams;
use crate::telemetry::metrics::{StatsRow, StatsSource};
use crate::telemetry::Metrics;

/// The proxy's reader of the state: rebuilds the route table from each
/// snapshot and swaps it in; the accept loop loads it per connection.
pub struct RoutesView {
    table: Arc<ArcSwap<RouteTable>>,
    registry: Arc<Registry>,
    /// Upstream HTTP pools, kept for the endpoints still in use.
    upstreams: Arc<Upstreams>,
    /// Retry budgets and rate limiters, kept while their policy is.
    policies: Policies,
    local: Local,
    metrics: Arc<Metrics>,
}

impl RoutesView {
    pub fn new(registry: Arc<Registry>, local: Local, metrics: Arc<Metrics>) -> Self {
        let table = Arc::new(ArcSwap::from_pointee(RouteTable::default()));
        Self { table, registry, upstreams: Arc::default(), policies: Policies::default(), local, metrics }
    }

    pub fn upstreams(&self) -> Arc<Upstreams> {
        self.upstreams.clone()
    }

    pub fn table(&self) -> Arc<ArcSwap<RouteTable>> {
        self.table.clone()
    }
}

impl View for RoutesView {
    fn update(&self, snap: &Snapshot) {
        let current = self.table.load();
        let (r, p, l, m) = (&self.registry, &self.policies, &self.local, &self.metrics);
        match &snap.delta {
            // One write after the table's: only what it changed.
            Some(d) if current.generation + 1 == snap.generation => {
                let next = RouteTable::apply(&current, snap, d, r, p, l, m);
                for f in &d.changed {
                    if let (Some(new), Some(old)) = (next.by_id.get(&f.id), current.by_id.get(&f.id)) {
                        new.adopt_series(old);
                        old.forget_series_missing_from(Some(new), true, m);
                    }
                }
                for id in &d.removed {
                    if let Some(old) = current.by_id.get(id) {
                        let stays = next.has_port(&old.key);
                        old.forget_series_missing_from(None, stays, m);
                        if !stays {
                            self.policies.forget(&old.key);
                        }
                    }
                }
                let gone: HashSet<SocketAddr> = d.gone.iter().copied().collect();
                if !gone.is_empty() {
                    self.upstreams.retain(|a| !gone.contains(&a));
                }
                self.table.store(Arc::new(next));
            }
            _ => {
                let next = RouteTable::build_from(&snap.state, &snap.frontends, snap.generation, &current, r, p, l, m);
                next.adopt_all_series(&current);
                let keys: HashSet<&PortKey> = next.by_id.values().map(|r| &r.key).collect();
                self.policies.retain(|k| keys.contains(k));
                let in_use: HashSet<SocketAddr> =
                    next.by_id.values().flat_map(|r| r.endpoints.iter().map(|e| e.state.addr)).collect();
                self.upstreams.retain(|a| in_use.contains(&a));
                self.table.swap(Arc::new(next)).forget_series_missing_from(&self.table.load(), &self.metrics);
            }
        }
    }
}

impl StatsSource for RoutesView {
    fn stats_rows(&self) -> Vec<StatsRow> {
        self.table.load().stats_rows()
    }
}
