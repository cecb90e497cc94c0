//! The control plane: the desired state, its persistence, and applying it.
//!
//! Every write is an edit of a copy of the document. The copy is validated
//! whole, including what it needs in each kernel map; this node's
//! workloads are resolved to their netns cookies; the kernel maps are
//! synced, the result saved (write-temp, fsync, rename), the proxy's routes
//! swapped, and only then the write is answered. Writes are serialized; a
//! step that fails puts the maps back as they were and saves nothing.
//! Health changes re-sync the kernel maps without a write ([`Control::resync`]).
//!
//! A saved state that no longer fits the maps at start (the daemon was
//! started onto a smaller slot map) does not stop the daemon: the
//! kernel-mode services that do not fit are served by the proxy instead,
//! `/ready` says why, and writes must fit again.
#![forbid(unsafe_code)]

pub mod api;
mod errors;
mod lifecycle;
mod plan;
mod render;
mod start;
mod store;
mod sync;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::{ArcSwap, ArcSwapOption};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Unit;
use serde_json::{json, Value};
use tokio::time::Instant;
use tracing::{debug, info, warn};

pub use errors::{HandoverError, MapsError, Rollback, StartError, WriteError};
pub use plan::plan;
#[cfg(test)]
use plan::Planned;
pub use render::LiveView;
pub use start::Prepared;
pub use store::{Store, StoreError, Stored};

use crate::balance::select::Candidate;
use crate::balance::{self, BalanceConfig, Registry};
use crate::datapath::{self, Datapath, DatapathError, Dump, MapContents, MapsView};
use crate::model::{
    self, Changes, Delta, Document, FieldError, Index, MapCapacity, MapNeeds, Mode, NodeName, Snapshot, State,
    ValidationErrors, View,
};

use crate::telemetry::admin::NotReady;
use crate::telemetry::metrics::{EndpointGauges, Live, MapFill, Metrics, ResultLabels, StatsRow, StatsSource};

pub struct ControlConfig {
    pub node: NodeName,
    pub state_dir: PathBuf,
    /// The outbound listeners (one per family; one port).
    pub proxy_listen: Vec<SocketAddr>,
    /// The most slots of a kernel-mode service table.
    pub slot_table_size: u32,
    /// `--slot-entries`: what `SLOTS` holds until the datapath says.
    pub slot_entries: u32,
    pub balance: BalanceConfig,
    pub metrics: Arc<Metrics>,
    /// Who writes the state when it is not the control API (e.g.
    /// Kubernetes discovery); the API then refuses writes, naming it.
    pub managed_by: Option<&'static str>,
}

/// The accepted state and what the kernel view of it needs.
struct Current {
    /// Shared with readers of the last accepted state: no copy per write.
    stored: Arc<Stored>,
    state: Arc<State>,
    /// The state's service ports with their ids: made once per state, for
    /// the maps (every sync) and the snapshot.
    frontends: Arc<Vec<model::Frontend>>,
    /// Netns cookies of this node's workloads.
    cookies: Vec<u64>,
    /// The state's services counted, for checking the next write by what
    /// it changes.
    index: Index,
    /// What the write that made this state changed.
    changes: Arc<Changes>,
    /// Endpoint address -> the kernel-mode frontends (indices into
    /// `frontends`) with it: which slot tables a health change touches.
    /// Made on the first health change of this state.
    kernel_by_addr: OnceLock<HashMap<SocketAddr, Vec<usize>>>,
}

impl Current {
    fn kernel_by_addr(&self) -> &HashMap<SocketAddr, Vec<usize>> {
        self.kernel_by_addr.get_or_init(|| {
            let mut m: HashMap<SocketAddr, Vec<usize>> = HashMap::new();
            for (k, f) in self.frontends.iter().enumerate() {
                let s = &self.state.services[f.service];
                if s.mode == Mode::Kernel {
                    for e in &s.endpoints {
                        m.entry(e.addr(f.target_port)).or_default().push(k);
                    }
                }
            }
            m
        })
    }
}

impl Current {
    /// Everything made from the state itself.
    fn new(stored: Stored, state: State, cookies: Vec<u64>, table_size: u32) -> Self {
        let frontends = Arc::new(state.frontends(&stored.ids));
        let index = Index::of(&state, table_size);
        let changes = Arc::new(Changes { whole: true, ..Changes::default() });
        Current {
            stored: Arc::new(stored),
            state: Arc::new(state),
            frontends,
            cookies,
            index,
            changes,
            kernel_by_addr: OnceLock::new(),
        }
    }
}

struct Inner {
    current: Current,
    datapath: Option<Datapath>,
    /// What the maps were last synced to, whole: a write that comes with
    /// a delta updates and syncs only its entries. None after a failure.
    synced: Option<MapContents>,
}

/// A reader of every accepted state that also counts into `meshctl
/// stats` rows (the proxy's routes, the inbound view, the health checks).
pub trait Reader: View + StatsSource {}
impl<T: View + StatsSource> Reader for T {}

/// The control plane's own series.
struct Series {
    generation: Gauge,
    map_sync: Histogram,
    /// Writes by [`WRITE_RESULTS`] index.
    writes: [prometheus_client::metrics::counter::Counter; WRITE_RESULTS.len()],
}

/// Registers the control plane's series into `m` (what a daemon's control
/// plane does when it starts), for the metrics reference.
pub fn register_series(m: &Metrics) {
    let _ = Series::register(m);
}

/// The `result` of a write to the state: `applied`, or why it was not.
pub const WRITE_RESULTS: [&str; 7] =
    ["applied", "conflict", "invalid", "not_found", "store", "datapath", "unavailable"];

impl Series {
    fn register(m: &Metrics) -> Self {
        let generation = Gauge::default();
        let map_sync = Histogram::new(exponential_buckets(0.000_01, 2.0, 16));
        let writes: prometheus_client::metrics::family::Family<
            ResultLabels,
            prometheus_client::metrics::counter::Counter,
        > = Default::default();
        m.register("state_generation", "Generation of the accepted state", generation.clone());
        m.register_with_unit("map_sync_duration", "Time to sync the kernel maps", Unit::Seconds, map_sync.clone());
        m.register(
            "state_writes",
            "Writes to the state (control API, file reload, Kubernetes), by result: applied, or why not",
            writes.clone(),
        );
        Self {
            generation,
            map_sync,
            writes: WRITE_RESULTS.map(|result| writes.get_or_create(&ResultLabels { result }).clone()),
        }
    }

    /// Counts one write by its outcome (its index in [`WRITE_RESULTS`]).
    fn write(&self, r: &Result<u64, WriteError>) {
        let result = match r {
            Ok(_) => 0,
            Err(WriteError::Conflict { .. }) => 1,
            Err(WriteError::Invalid(_)) => 2,
            Err(WriteError::NotFound(_)) => 3,
            Err(WriteError::Store(_)) => 4,
            Err(WriteError::Datapath { .. }) => 5,
            Err(WriteError::Stopped | WriteError::HandingOver) => 6,
        };
        self.writes[result].inc();
    }
}

pub struct Control {
    series: Series,
    cfg: ControlConfig,
    store: Store,
    own_netns: u64,
    inner: Mutex<Inner>,
    /// The last accepted state, for readers: as saved, and validated.
    snapshot: ArcSwap<Stored>,
    published: ArcSwap<Snapshot>,
    registry: Arc<Registry>,
    /// Readers that derive their views from each accepted state (the
    /// proxy's routes, the tunnel's inbound checks, the health checks);
    /// registered before the datapath is attached.
    views: Vec<Arc<dyn Reader>>,
    /// Why the daemon is not ready though it runs (the saved state does
    /// not fit the maps, or the maps could not be put back); None: ready.
    problem: ArcSwapOption<String>,
    /// Read handles of the maps: counters and dumps never wait for a write.
    view: OnceLock<MapsView>,
    attached: AtomicBool,
    /// No kernel datapath at all ([`Prepared::detached`]): writes are
    /// planned, saved and published only.
    detached: bool,
    reused: AtomicBool,
    /// Entries of `SLOTS` as loaded.
    slot_capacity: AtomicUsize,
}

impl Control {
    /// Who owns the state, when the control API must not write it.
    pub fn managed_by(&self) -> Option<&'static str> {
        self.cfg.managed_by
    }

    pub fn node(&self) -> &NodeName {
        &self.cfg.node
    }

    /// The state of every endpoint address in use, shared with the views.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// The last accepted state.
    pub fn snapshot(&self) -> Arc<Stored> {
        self.snapshot.load_full()
    }

    /// The backendRefs of the published state's routes that do not
    /// resolve (their share of requests is answered 500), as
    /// `path: why (reason)` lines, with the generation they are of.
    pub fn unresolved_refs(&self) -> (u64, Vec<String>) {
        let p = self.published.load();
        (p.generation, p.state.routes.unresolved.iter().map(ToString::to_string).collect())
    }

    /// Publishes an accepted state: a snapshot every view derives its own
    /// view from, and the registry keeps only the addresses in use.
    /// `delta`: what changed since the state published last.
    fn accepted(&self, current: &Current, delta: Option<Delta>) {
        self.series.generation.set(current.stored.generation as i64);
        let snap = Arc::new(Snapshot {
            generation: current.stored.generation,
            state: current.state.clone(),
            frontends: current.frontends.clone(),
            delta: delta.map(Arc::new),
        });
        for v in &self.views {
            v.update(&snap);
        }
        match &snap.delta {
            Some(d) => self.registry.forget(&d.gone),
            None => {
                let in_use: HashSet<SocketAddr> = snap
                    .frontends
                    .iter()
                    .flat_map(|f| snap.state.services[f.service].endpoints.iter().map(move |e| e.addr(f.target_port)))
                    .collect();
                self.registry.retain(&in_use);
            }
        }
        self.published.store(snap);
        self.snapshot.store(current.stored.clone());
    }

    /// What `edit` would change, checked as [`Control::write`] checks it
    /// (generation, validation, the maps' room, this node's network
    /// namespaces), with nothing applied, saved or written: the current
    /// generation, and each item added, removed or changed.
    pub fn dry_run(
        &self,
        if_match: Option<u64>,
        edit: impl FnOnce(&mut Document) -> Result<(), WriteError>,
    ) -> Result<(u64, Vec<model::DiffEntry>), WriteError> {
        let guard = self.inner.lock().map_err(|_| WriteError::Stopped)?;
        let current = &guard.current;
        let prev = (current.stored.as_ref(), current.state.as_ref(), &current.index);
        let p = plan(prev, if_match, &self.cfg.node, &self.capacity(), edit)?;
        self.local_cookies(&p.state, true).map_err(WriteError::Invalid)?;
        Ok((current.stored.generation, model::diff(&current.stored.state, &p.stored.state)))
    }

    /// Applies `edit` to a copy of the document; see the module doc.
    /// Returns the new generation.
    pub fn write(
        &self,
        if_match: Option<u64>,
        edit: impl FnOnce(&mut Document) -> Result<(), WriteError>,
    ) -> Result<u64, WriteError> {
        let r = self.apply(if_match, edit);
        self.series.write(&r);
        r
    }

    /// [`Control::write`] but for counting its result.
    fn apply(
        &self,
        if_match: Option<u64>,
        edit: impl FnOnce(&mut Document) -> Result<(), WriteError>,
    ) -> Result<u64, WriteError> {
        let mut guard = self.inner.lock().map_err(|_| WriteError::Stopped)?;
        let Inner { current, datapath, synced } = &mut *guard;
        let t0 = tokio::time::Instant::now();
        let prev = (current.stored.as_ref(), current.state.as_ref(), &current.index);
        let p = plan(prev, if_match, &self.cfg.node, &self.capacity(), edit)?;
        let p_index_change = p.index_change;
        let cookies = self.local_cookies(&p.state, true).map_err(WriteError::Invalid)?;
        let mut next = Current {
            frontends: p.frontends.unwrap_or_else(|| current.frontends.clone()),
            stored: Arc::new(p.stored),
            state: Arc::new(p.state),
            cookies,
            index: Index::default(),
            changes: Arc::new(p.changes),
            kernel_by_addr: OnceLock::new(),
        };
        let same = Arc::ptr_eq(&next.frontends, &current.frontends);
        let mut delta = Delta::of(&next.changes, &current.frontends, &next.frontends, same, &next.state);
        let planned = t0.elapsed();
        let generation = next.stored.generation;
        let (want, report) = match datapath.as_mut() {
            Some(dp) => {
                // The entries the write changed, when the maps hold the
                // state before as it is; all of them otherwise.
                let incremental = synced
                    .take()
                    .zip(delta.as_ref())
                    .filter(|_| self.problem.load().is_none() && next.cookies == current.cookies);
                let (want, r) = self.sync_to(dp, &next, incremental, |want, d, healthy| {
                    want.update(&next.state, d, self.cfg.slot_table_size, healthy)
                });
                match r {
                    Ok(r) => (Some(want), r),
                    Err(source) => {
                        return Err(WriteError::Datapath { rollback: Box::new(self.roll_back(dp, current)), source })
                    }
                }
            }
            None if self.detached => (None, datapath::SyncReport::default()),
            None => return Err(WriteError::HandingOver),
        };
        let synced_at = t0.elapsed();
        if let Err(e) = self.store.save_change(&current.stored, &next.stored, &next.changes, &next.state) {
            // The maps took the new state but it is not saved: put them back.
            if let Some(dp) = datapath.as_mut() {
                let rollback = self.roll_back(dp, current);
                warn!(error = %e, %rollback, "the state could not be saved");
            }
            return Err(e.into());
        }
        *synced = want;
        let saved = t0.elapsed();
        next.index = if next.changes.whole {
            Index::of(&next.state, self.cfg.slot_table_size)
        } else {
            let mut index = std::mem::take(&mut current.index);
            index.apply(&p_index_change);
            index
        };
        if let Some(d) = delta.as_mut() {
            d.gone = next
                .changes
                .removed
                .iter()
                .flat_map(|(_, s)| {
                    s.ports.iter().flat_map(move |p| s.endpoints.iter().map(move |e| e.addr(p.target_port)))
                })
                .filter(|a| !next.index.uses(*a))
                .collect();
        }
        self.accepted(&next, delta);
        let old = std::mem::replace(current, next);
        // A state that passed planning fits: whatever kept the daemon from
        // being ready is over.
        self.problem.store(None);
        let ms = |d: std::time::Duration| (d.as_secs_f64() * 1e5).round() / 100.0;
        info!(
            generation,
            written = report.written,
            deleted = report.deleted,
            plan_ms = ms(planned),
            sync_ms = ms(synced_at - planned),
            save_ms = ms(saved - synced_at),
            publish_ms = ms(t0.elapsed() - saved),
            "state applied"
        );
        if !Arc::ptr_eq(&old.state.routes, &current.state.routes) {
            for u in &current.state.routes.unresolved {
                warn!(generation, backend_ref = %u.path, reason = u.reason.as_str(), "{}; its share of the rule's requests is answered 500", u.message);
            }
        }
        crate::heap::release_after(old);
        Ok(generation)
    }
}

/// A control plane without a kernel datapath, for the API's unit tests
/// and its fuzz target.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod testing {
    use super::*;

    /// Two nodes, a workload on the other node, a proxy-mode, a
    /// kernel-mode and an HTTP service.
    pub(crate) const SEED: &str = "nodes: [{name: a, address: 172.18.0.2}, {name: b, address: 172.18.0.3}]
workloads:
  - {name: client, namespace: default, serviceAccount: client, node: b, ip: 10.244.2.2, netns: /var/run/netns/client}
services:
  - {name: web, vip: 10.96.0.10, ports: [{port: 80, targetPort: 8080}], endpoints: [{ip: 10.244.1.4, node: a}, {ip: 10.244.2.4, node: b, weight: 3}]}
  - {name: fast, vip: 10.96.0.11, mode: kernel, ports: [{port: 9000}], endpoints: [{ip: 10.244.1.5, node: a}]}
  - {name: api, vip: 10.96.0.12, ports: [{port: 80, appProtocol: http}], endpoints: [{ip: 10.244.2.6, node: b}]}
";

    /// Node a's control plane seeded with [`SEED`], its state under `dir`
    /// (made anew), taking writes without a datapath.
    pub(crate) fn detached(dir: &std::path::Path, metrics: Arc<Metrics>, managed_by: Option<&'static str>) -> Control {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).expect("the state dir");
        std::fs::write(dir.join("seed.yaml"), SEED).expect("the seed");
        let cfg = ControlConfig {
            node: NodeName::parse("a").expect("a node name"),
            state_dir: dir.join("state"),
            proxy_listen: vec![SocketAddr::new([0, 0, 0, 0].into(), 15001)],
            slot_table_size: 64,
            slot_entries: 4096,
            balance: Default::default(),
            metrics,
            managed_by,
        };
        Control::prepare(cfg, Some(dir.join("seed.yaml"))).expect("the seed state").detached()
    }
}

#[cfg(test)]
mod tests;
