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
mod store;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::{ArcSwap, ArcSwapOption};
use serde_json::{json, Value};
use tokio::time::Instant;
use tracing::{debug, info, warn};

pub use store::{Store, StoreError, Stored};

use crate::balance::select::Candidate;
use crate::balance::{self, BalanceConfig, Registry};
use crate::datapath::{self, Datapath, DatapathError, Dump, MapContents, MapsView};
use crate::model::{
    self, Changes, Delta, Document, FieldError, Index, MapCapacity, MapNeeds, Mode, NodeName, Snapshot, State,
    ValidationErrors, View,
};

use crate::telemetry::admin::NotReady;
use crate::telemetry::metrics::{EndpointGauges, Live, Metrics, StatsRow, StatsSource};

pub struct ControlConfig {
    pub node: NodeName,
    pub state_dir: PathBuf,
    pub proxy_listen: SocketAddrV4,
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

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("the state is at generation {current}, not {expected}: read it again and retry")]
    Conflict { current: u64, expected: u64 },
    #[error("the request is invalid:\n{0}")]
    Invalid(ValidationErrors),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the kernel maps could not be updated ({source}); {rollback}; nothing was saved")]
    Datapath { source: DatapathError, rollback: Box<Rollback> },
    #[error("the daemon is shutting down")]
    Stopped,
    #[error("a new mesh-daemon is taking over on this node; nothing was changed: retry in a few seconds")]
    HandingOver,
}

/// Why the control plane cannot start: each names the input and the fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Config(#[from] model::ConfigError),
    #[error("{0}")]
    Invalid(String),
    #[error("writing the maps: {0}")]
    Maps(DatapathError),
    #[error("--api-group {0}: no such group; create it (groupadd {0}) or drop the flag")]
    NoGroup(String),
    #[error("--api-socket {0}: another mesh-daemon is serving there")]
    SocketInUse(PathBuf),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Sys(#[from] nix::Error),
}

/// Why the kernel maps cannot be read now.
#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("the datapath is not attached yet")]
    NotAttached,
    #[error(transparent)]
    Kernel(#[from] DatapathError),
}

/// Why a step of a handover could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("the daemon's state lock is poisoned")]
    Poisoned,
    #[error("the datapath is let go already (shutting down or handing over)")]
    Released,
    #[error("the kernel maps could not be written after taking the datapath back: {0}")]
    Resync(DatapathError),
}

/// What became of the maps after a failed write.
#[derive(Debug)]
pub enum Rollback {
    Done { generation: u64 },
    Failed { generation: u64, error: DatapathError },
}

impl std::fmt::Display for Rollback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rollback::Done { generation } => write!(f, "they were put back as generation {generation}"),
            Rollback::Failed { generation, error } => write!(
                f,
                "putting them back as generation {generation} failed too ({error}): they differ from it until the next write"
            ),
        }
    }
}

/// One endpoint of one service, as `meshctl get endpoints` and the
/// metrics show it.
#[derive(Debug, Clone)]
pub struct EndpointRow {
    pub service: String,
    pub ip: Ipv4Addr,
    pub node: NodeName,
    pub weight: u16,
    pub effective_weight: u16,
    pub priority: u8,
    pub view: crate::balance::EndpointView,
}

/// What a scrape reads from a running [`Control`] (weakly held: the
/// metrics outlive no daemon).
pub struct LiveView(pub std::sync::Weak<Control>);

impl Live for LiveView {
    fn kernel(&self) -> Vec<(&'static str, u64)> {
        let Some(c) = self.0.upgrade() else { return Vec::new() };
        c.kernel_stats().map(|v| v.into_iter().map(|(s, n)| (s.name(), n)).collect()).unwrap_or_default()
    }

    fn endpoints(&self) -> Vec<EndpointGauges> {
        let Some(c) = self.0.upgrade() else { return Vec::new() };
        c.endpoint_rows()
            .into_iter()
            .map(|r| EndpointGauges {
                service: r.service,
                endpoint: r.ip.to_string(),
                healthy: r.view.active == "healthy",
                effective_weight: r.effective_weight,
                ewma_rtt: std::time::Duration::from_secs_f64(r.view.ewma_rtt_ms / 1000.0),
            })
            .collect()
    }
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
    kernel_by_addr: OnceLock<HashMap<SocketAddrV4, Vec<usize>>>,
}

impl Current {
    fn kernel_by_addr(&self) -> &HashMap<SocketAddrV4, Vec<usize>> {
        self.kernel_by_addr.get_or_init(|| {
            let mut m: HashMap<SocketAddrV4, Vec<usize>> = HashMap::new();
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

pub struct Control {
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

/// A checked state, ready to be written to the datapath.
pub struct Prepared {
    control: Control,
    current: Current,
}

impl Prepared {
    /// Adds a reader of every accepted state, the first one included.
    pub fn subscribe(&mut self, view: Arc<dyn Reader>) {
        self.control.views.push(view);
    }

    /// See [`Control::registry`].
    pub fn registry(&self) -> Arc<Registry> {
        self.control.registry()
    }

    /// Takes writes without a kernel datapath: they are checked, saved and
    /// published to the views, and nothing else. For fuzzing the control
    /// API and for tests that need no kernel.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn detached(self) -> Control {
        let Prepared { mut control, current } = self;
        control.detached = true;
        control.accepted(&current, None);
        if let Ok(mut inner) = control.inner.lock() {
            *inner = Inner { current, datapath: None, synced: None };
        }
        control
    }

    /// Syncs the datapath to the state and starts taking writes. On error
    /// the datapath is handed back.
    /// `view` reads the same maps through its own handles.
    pub fn attach(self, mut datapath: Datapath, view: MapsView) -> Result<Control, Box<(StartError, Datapath)>> {
        let Prepared { control, current } = self;
        control.slot_capacity.store(datapath.slot_capacity(), Ordering::Relaxed);
        let needs = MapNeeds::of(&current.state, &control.cfg.node, control.cfg.slot_table_size);
        if let Err(e) = needs.check(&control.capacity()) {
            let why = format!(
                "the saved state (generation {}) does not fit the kernel maps: {e}; kernel-mode services that do not fit are served by the proxy until a state that fits is applied",
                current.stored.generation
            );
            tracing::error!(reason = %why, "not ready");
            control.problem.store(Some(Arc::new(why)));
        }
        let contents = control.contents(&current);
        if let Err(e) = control.timed_sync(&mut datapath, &contents) {
            return Err(Box::new((StartError::Maps(e), datapath)));
        }
        control.accepted(&current, None);
        control.reused.store(datapath.reused(), Ordering::Relaxed);
        if let Ok(mut inner) = control.inner.lock() {
            *inner = Inner { current, datapath: Some(datapath), synced: Some(contents) };
        }
        let _ = control.view.set(view);
        control.attached.store(true, Ordering::Release);
        Ok(control)
    }
}

/// A write checked, not yet applied.
#[derive(Debug)]
pub struct Planned {
    pub stored: Stored,
    pub state: State,
    /// The frontends of `state`: those of the state before when the write
    /// left every service port where it was.
    pub frontends: Option<Arc<Vec<model::Frontend>>>,
    pub changes: Changes,
    /// What the write does to the index of the state before.
    pub index_change: Index,
}

/// The pure part of a write: checks the generation, applies `edit` to a
/// copy of the document (a copy of pointers: services are shared),
/// validates what changed against `prev`'s index, checks the maps' room
/// and assigns ids. `prev` is never changed.
pub fn plan(
    prev: (&Stored, &State, &Index),
    if_match: Option<u64>,
    node: &NodeName,
    capacity: &MapCapacity,
    edit: impl FnOnce(&mut Document) -> Result<(), WriteError>,
) -> Result<Planned, WriteError> {
    let (current, prev_state, index) = prev;
    if let Some(expected) = if_match {
        if expected != current.generation {
            return Err(WriteError::Conflict { current: current.generation, expected });
        }
    }
    let mut doc = current.state.clone();
    edit(&mut doc)?;
    let v = State::from_changes((&current.state, prev_state, index), &doc, capacity.slot_table_size)
        .map_err(WriteError::Invalid)?;
    let (state, changes, index_change) = (v.state, v.changes, v.index_change);
    for &i in &changes.changed {
        doc.shrink(i);
    }
    let workloads = state.workloads.iter().filter(|w| &w.node == node).count();
    let needs = if changes.whole {
        MapNeeds::of(&state, node, capacity.slot_table_size)
    } else {
        MapNeeds::after(index, &index_change, workloads)
    };
    needs.check(capacity).map_err(WriteError::Invalid)?;
    // Every service port where it was (services replaced in place, with
    // the same name, VIP and ports): the ids and frontends stay.
    let in_place = !changes.whole
        && changes.changed.len() == changes.removed.len()
        && changes.changed.iter().zip(&changes.removed).all(|(i, (j, old))| {
            let new = &state.services[*i];
            i == j
                && (&new.namespace, &new.name, new.vip, &new.ports) == (&old.namespace, &old.name, old.vip, &old.ports)
        });
    let (ids, frontends) = if in_place {
        (current.ids.clone(), None)
    } else {
        let ids = Arc::new(current.ids.assign(&state.frontend_keys()));
        let frontends = Arc::new(state.frontends(&ids));
        (ids, Some(frontends))
    };
    let stored = Stored { generation: current.generation + 1, ids, state: doc };
    Ok(Planned { stored, state, frontends, changes, index_change })
}

impl Control {
    /// Restores the saved state, or seeds it from `seed` (a config file)
    /// when nothing was saved, and checks all of it, before anything
    /// touches the kernel.
    pub fn prepare(cfg: ControlConfig, seed: Option<PathBuf>) -> Result<Prepared, StartError> {
        let control = Control {
            store: Store::new(&cfg.state_dir),
            own_netns: datapath::own_netns_cookie()?,
            inner: Mutex::new(Inner {
                current: Current::new(Stored::default(), State::default(), Vec::new(), cfg.slot_table_size),
                datapath: None,
                synced: None,
            }),
            snapshot: ArcSwap::from_pointee(Stored::default()),
            published: ArcSwap::from_pointee(Snapshot::default()),
            registry: Arc::new(Registry::new(cfg.balance)),
            views: Vec::new(),
            problem: ArcSwapOption::empty(),
            view: OnceLock::new(),
            attached: AtomicBool::new(false),
            detached: false,
            reused: AtomicBool::new(false),
            slot_capacity: AtomicUsize::new(cfg.slot_entries as usize),
            cfg,
        };
        let restored = control.store.load()?;
        let (mut stored, seeded) = match (restored, &seed) {
            (Some(s), _) => {
                info!(file = %control.store.path().display(), generation = s.generation, "state restored");
                if let Some(path) = &seed {
                    control.warn_if_config_differs(path, &s);
                }
                (s, false)
            }
            (None, Some(path)) => {
                let state = model::load_file(path)?;
                let text = std::fs::read_to_string(path)?;
                let doc = model::parse_document(&text)
                    .map_err(|e| StartError::Invalid(format!("config {}: {e}", path.display())))?;
                let ids = Arc::new(model::ServiceIds::default().assign(&state.frontend_keys()));
                info!(config = %path.display(), "state seeded from the config");
                (Stored { generation: 1, ids, state: doc }, true)
            }
            (None, None) => (Stored::default(), false),
        };
        for i in 0..stored.state.services.len() {
            stored.state.shrink(i);
        }
        let state = State::from_document(&stored.state).map_err(|e| {
            StartError::Invalid(format!(
                "state file {} is invalid; it was left as it is:\n{e}",
                control.store.path().display()
            ))
        })?;
        // A state that names nodes must name this one (an empty state waits
        // for its first write).
        if !state.nodes.is_empty() && state.node(&control.cfg.node).is_none() {
            let names: Vec<&str> = state.nodes.iter().map(|n| n.name.as_str()).collect();
            let source = match (&seed, seeded) {
                (Some(p), true) => format!("config {}", p.display()),
                _ => format!("state file {}", control.store.path().display()),
            };
            return Err(StartError::Invalid(format!(
                "--node {}: no such node in {source}; the nodes there are: {}",
                control.cfg.node,
                names.join(", ")
            )));
        }
        // A restored pod may be gone: skipped with a warning. A seeded config
        // is checked as strictly as an API write.
        let cookies = control.local_cookies(&state, seeded).map_err(|v| match &seed {
            Some(p) => StartError::Invalid(format!("config {}:\n{v}", p.display())),
            None => StartError::Invalid(v.to_string()),
        })?;
        if seeded {
            control.store.save(&stored)?;
        }
        let table_size = control.cfg.slot_table_size;
        Ok(Prepared { control, current: Current::new(stored, state, cookies, table_size) })
    }

    /// `--config` only seeds an empty state dir: when the saved state is
    /// served instead of a config that says otherwise, say so, and how to
    /// apply the config.
    fn warn_if_config_differs(&self, config: &std::path::Path, saved: &Stored) {
        let differs = match std::fs::read_to_string(config)
            .map_err(|e| model::Invalid(e.to_string()))
            .and_then(|t| model::parse_document(&t))
        {
            Ok(doc) if doc == saved.state => return,
            Ok(_) => "differs from".to_owned(),
            Err(e) => format!("cannot be read ({e}) to compare with"),
        };
        warn!(
            config = %config.display(),
            state_file = %self.store.path().display(),
            generation = saved.generation,
            "--config {} {differs} the saved state (generation {}), which is served: --config only seeds an empty state dir; to apply the config, run: meshctl apply -f {}",
            config.display(),
            saved.generation,
            config.display()
        );
    }

    /// What the kernel maps hold.
    fn capacity(&self) -> MapCapacity {
        MapCapacity {
            slots: self.slot_capacity.load(Ordering::Relaxed),
            ..MapCapacity::with_table_size(self.cfg.slot_table_size)
        }
    }

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

    /// Netns cookies of this node's workloads; with `strict`, a netns that
    /// cannot be read is an error, otherwise it is skipped with a warning.
    fn local_cookies(&self, state: &State, strict: bool) -> Result<Vec<u64>, ValidationErrors> {
        let mut cookies = Vec::new();
        let mut errors = Vec::new();
        for (i, w) in state.workloads.iter().enumerate().filter(|(_, w)| w.node == self.cfg.node) {
            let path = w.netns.path();
            let field = match w.netns {
                model::NetnsRef::Path(_) => format!("workloads[{i}].netns"),
                model::NetnsRef::Pid(_) => format!("workloads[{i}].pid"),
            };
            let problem = match datapath::netns_cookie(&path) {
                Ok(c) if c == self.own_netns => {
                    format!(
                        "{} is the daemon's own network namespace; a host-network pod cannot be enrolled",
                        path.display()
                    )
                }
                Ok(c) => {
                    cookies.push(c);
                    continue;
                }
                Err(e) => format!("cannot open network namespace {}: {e}", path.display()),
            };
            if strict {
                errors.push(FieldError { path: field, message: problem });
            } else {
                warn!(workload = %format!("{}/{}", w.namespace, w.name), problem, "workload skipped");
            }
        }
        if errors.is_empty() {
            Ok(cookies)
        } else {
            Err(ValidationErrors(errors))
        }
    }

    /// The map contents for `current`, with the health seen now; kernel-mode
    /// tables that do not fit the maps (only a restored state can have
    /// them: writes are checked) are left to the proxy.
    fn contents(&self, current: &Current) -> MapContents {
        let (state, frontends) = (&current.state, &current.frontends);
        let node_ip = state.node(&self.cfg.node).map(|n| n.address);
        let listen = self.cfg.proxy_listen;
        let proxy_ip = match (listen.ip().is_unspecified(), node_ip) {
            (true, Some(ip)) => ip,
            (true, None) => Ipv4Addr::UNSPECIFIED,
            (false, _) => *listen.ip(),
        };
        let proxy = SocketAddrV4::new(proxy_ip, listen.port());
        let registry = &self.registry;
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

    /// Syncs the maps to `current`. With `cached` (what the maps were
    /// last synced to, and what changed since), `edit` brings those
    /// contents up to date entry by entry and returns the keys it touched,
    /// and only those are synced; without, every entry is. Returns the
    /// contents the maps were synced to.
    fn sync_to<C>(
        &self,
        dp: &mut Datapath,
        current: &Current,
        cached: Option<(MapContents, C)>,
        edit: impl FnOnce(&mut MapContents, C, &dyn Fn(SocketAddrV4) -> bool) -> BTreeSet<mesh_common::ServiceKey>,
    ) -> (MapContents, Result<datapath::SyncReport, DatapathError>) {
        match cached {
            Some((mut want, change)) => {
                let registry = &self.registry;
                let keys = edit(&mut want, change, &|a| registry.actively_healthy(a));
                let t0 = tokio::time::Instant::now();
                let r = dp.sync_keys(&want, &keys);
                self.cfg.metrics.map_sync.observe(t0.elapsed().as_secs_f64());
                (want, r)
            }
            None => {
                let want = self.contents(current);
                let r = self.timed_sync(dp, &want);
                (want, r)
            }
        }
    }

    fn timed_sync(&self, dp: &mut Datapath, contents: &MapContents) -> Result<datapath::SyncReport, DatapathError> {
        let t0 = tokio::time::Instant::now();
        let r = dp.sync(contents);
        self.cfg.metrics.map_sync.observe(t0.elapsed().as_secs_f64());
        r
    }

    /// `/metrics`: nothing is copied or waited for; the kernel's counters
    /// and the endpoints' state are read during the encoding (see
    /// [`LiveView`]).
    pub fn render_metrics(&self) -> String {
        self.cfg.metrics.encode()
    }

    /// Publishes an accepted state: a snapshot every view derives its own
    /// view from, and the registry keeps only the addresses in use.
    /// `delta`: what changed since the state published last.
    fn accepted(&self, current: &Current, delta: Option<Delta>) {
        self.cfg.metrics.generation.set(current.stored.generation as i64);
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
                let in_use: HashSet<SocketAddrV4> = snap
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

    /// Applies `edit` to a copy of the document; see the module doc.
    /// Returns the new generation.
    pub fn write(
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
        crate::heap::release_after(old);
        Ok(generation)
    }

    /// Puts the maps back to `current` after a failed write.
    fn roll_back(&self, dp: &mut Datapath, current: &Current) -> Rollback {
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
    pub fn resync(&self, changed: &[SocketAddrV4]) {
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

    /// Every endpoint with its configured and effective weight, priority,
    /// health, latency estimate and connections in flight.
    pub fn endpoint_rows(&self) -> Vec<EndpointRow> {
        let published = self.published.load();
        let state = &published.state;
        let now = Instant::now();
        let mut out = Vec::new();
        for s in &state.services {
            let Some(port) = s.ports.first() else {
                continue;
            };
            let states: Vec<_> = s.endpoints.iter().map(|e| self.registry.get(e.addr(port.target_port))).collect();
            let members: Vec<_> = s.endpoints.iter().zip(&states).collect();
            let effective = balance::effective_weights(&members, s.fail_open, |(e, st)| Candidate {
                weight: e.weight.0,
                priority: e.priority,
                available: match s.mode {
                    Mode::Kernel => st.actively_healthy(),
                    Mode::Proxy => st.available(now),
                },
            });
            for ((e, st), effective_weight) in s.endpoints.iter().zip(&states).zip(effective) {
                out.push(EndpointRow {
                    service: s.key(),
                    ip: e.ip,
                    node: e.node.clone(),
                    weight: e.weight.0,
                    effective_weight,
                    priority: e.priority,
                    view: st.view(now),
                });
            }
        }
        out
    }

    /// `meshctl stats`: per service port and endpoint, outbound then
    /// inbound, from the series the proxy counts into.
    pub fn stats_rows(&self) -> Vec<StatsRow> {
        self.views.iter().flat_map(|v| v.stats_rows()).collect()
    }

    /// [`Control::endpoint_rows`] as the API shows them.
    pub fn endpoints(&self) -> Vec<Value> {
        self.endpoint_rows()
            .into_iter()
            .map(|r| {
                json!({
                    "service": r.service,
                    "ip": r.ip.to_string(),
                    "node": r.node.as_str(),
                    "weight": r.weight,
                    "effectiveWeight": r.effective_weight,
                    "priority": r.priority,
                    "health": r.view.active,
                    "breaker": r.view.breaker,
                    "reason": r.view.reason,
                    "sinceChangeSeconds": r.view.since_change_s,
                    "ewmaRttMs": r.view.ewma_rtt_ms,
                    "inFlight": r.view.in_flight,
                })
            })
            .collect()
    }

    fn view(&self) -> Result<&MapsView, MapsError> {
        self.view.get().ok_or(MapsError::NotAttached)
    }

    /// Every entry of the maps: walks them all, so call it off the async
    /// workers.
    pub fn dump(&self) -> Result<Dump, MapsError> {
        Ok(self.view()?.dump()?)
    }

    pub fn datapath_reused(&self) -> bool {
        self.reused.load(Ordering::Relaxed)
    }

    pub fn kernel_stats(&self) -> Result<Vec<(mesh_common::Stat, u64)>, MapsError> {
        Ok(self.view()?.stats()?)
    }

    /// Ready: the datapath is attached and holds the accepted state.
    /// Otherwise, why not. Takes no lock: a write in progress does not
    /// hold it up.
    pub fn readiness(&self) -> Result<(), NotReady> {
        if let Some(p) = self.problem.load_full() {
            return Err(NotReady((*p).clone()));
        }
        if self.attached.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(NotReady("the datapath is not attached".into()))
        }
    }

    /// For a handover: stops writing the maps (writes are refused with
    /// [`WriteError::HandingOver`], health changes wait) and drops the
    /// datapath's handles, leaving it attached and pinned for the next
    /// daemon. Returns the state's generation.
    pub fn suspend(&self) -> Result<u64, HandoverError> {
        let mut inner = self.inner.lock().map_err(|_| HandoverError::Poisoned)?;
        let dp = inner.datapath.take().ok_or(HandoverError::Released)?;
        inner.synced = None;
        dp.shutdown(false);
        Ok(inner.current.stored.generation)
    }

    /// After a handover that failed: takes the datapath back and writes
    /// the whole state to it (the other daemon may have written it too).
    pub fn resume(&self, mut dp: Datapath) -> Result<(), HandoverError> {
        let mut inner = self.inner.lock().map_err(|_| HandoverError::Poisoned)?;
        let want = self.contents(&inner.current);
        let r = self.timed_sync(&mut dp, &want);
        inner.datapath = Some(dp);
        match r {
            Ok(_) => {
                inner.synced = Some(want);
                Ok(())
            }
            Err(e) => {
                let e = HandoverError::Resync(e);
                self.problem.store(Some(Arc::new(e.to_string())));
                Err(e)
            }
        }
    }

    /// Stops taking writes and hands the datapath to `shutdown`.
    pub fn shutdown(&self, cleanup: bool) {
        self.attached.store(false, Ordering::Release);
        if let Ok(mut inner) = self.inner.lock() {
            if let Some(dp) = inner.datapath.take() {
                dp.shutdown(cleanup);
            }
        }
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
            proxy_listen: SocketAddrV4::new([0, 0, 0, 0].into(), 15001),
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
mod tests {
    use super::*;
    use crate::model::parse_document;

    fn node() -> NodeName {
        NodeName::parse("a").unwrap()
    }

    fn stored() -> Stored {
        let doc = parse_document(
            "nodes: [{name: a, address: 172.18.0.2}]\n\
             services:\n - {name: web, vip: 10.96.0.10, ports: [{port: 80}], endpoints: [{ip: 10.0.0.1, node: a}]}\n",
        )
        .unwrap();
        let state = State::from_document(&doc).unwrap();
        Stored { generation: 4, ids: Arc::new(model::ServiceIds::default().assign(&state.frontend_keys())), state: doc }
    }

    /// [`plan`] on `cur`, with its state and index made here.
    fn plan_on(
        cur: &Stored,
        if_match: Option<u64>,
        capacity: &MapCapacity,
        edit: impl FnOnce(&mut Document) -> Result<(), WriteError>,
    ) -> Result<Planned, WriteError> {
        let state = State::from_document(&cur.state).unwrap();
        let index = Index::of(&state, capacity.slot_table_size);
        plan((cur, &state, &index), if_match, &node(), capacity, edit)
    }

    #[test]
    fn a_batch_with_one_bad_endpoint_changes_nothing() {
        let cur = stored();
        let before = cur.clone();
        let batch = parse_document(
            "nodes: [{name: a, address: 172.18.0.2}]\n\
             services:\n - {name: web, vip: 10.96.0.10, ports: [{port: 80}], endpoints: [{ip: 10.0.0.1, node: a}, {ip: 10.0.0.2, node: a}]}\n\
             \x20- {name: api, vip: 10.96.0.11, ports: [{port: 80}], endpoints: [{ip: 10.0.0.300, node: a}]}\n",
        )
        .unwrap();
        let e = plan_on(&cur, None, &MapCapacity::default(), |d| {
            *d = batch;
            Ok(())
        })
        .unwrap_err();
        match e {
            WriteError::Invalid(v) => {
                assert_eq!(v.0.len(), 1, "{v}");
                assert_eq!(v.0[0].path, "services[1].endpoints[0].ip");
            }
            other => panic!("expected a validation error, got {other}"),
        }
        assert_eq!(cur, before);
    }

    #[test]
    fn a_stale_generation_conflicts_and_the_current_one_applies() {
        let cur = stored();
        let e = plan_on(&cur, Some(3), &MapCapacity::default(), |_| Ok(())).unwrap_err();
        assert!(matches!(e, WriteError::Conflict { current: 4, expected: 3 }), "{e}");
        assert!(e.to_string().contains("generation 4, not 3"), "{e}");
        let next = plan_on(&cur, Some(4), &MapCapacity::default(), |d| {
            Arc::make_mut(&mut d.services[0]).endpoints[0].weight = 7;
            Ok(())
        })
        .unwrap()
        .stored;
        assert_eq!(next.generation, 5);
        assert_eq!(next.state.services[0].endpoints[0].weight, 7);
        assert_eq!(next.ids, cur.ids, "same service ports keep their ids");
        let unconditional = plan_on(&cur, None, &MapCapacity::default(), |_| Ok(())).unwrap().stored;
        assert_eq!(unconditional.generation, 5);
    }

    #[test]
    fn an_edit_error_is_returned_as_is() {
        let e = plan_on(&stored(), None, &MapCapacity::default(), |_| {
            Err(WriteError::NotFound("service x/y not found".into()))
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "service x/y not found");
    }
}
