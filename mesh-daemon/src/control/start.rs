//! How the control plane starts: the state restored (or seeded from
//! `--config`) and checked whole before anything touches the kernel, this
//! node's workloads resolved to their netns cookies, then the datapath
//! written and writes taken.

use super::*;

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

impl Control {
    /// Restores the saved state, or seeds it from `seed` (a config file)
    /// when nothing was saved, and checks all of it, before anything
    /// touches the kernel.
    pub fn prepare(cfg: ControlConfig, seed: Option<PathBuf>) -> Result<Prepared, StartError> {
        let control = Control {
            series: Series::register(&cfg.metrics),
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
    pub(super) fn warn_if_config_differs(&self, config: &std::path::Path, saved: &Stored) {
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

    /// Netns cookies of this node's workloads; with `strict`, a netns that
    /// cannot be read is an error, otherwise it is skipped with a warning.
    pub(super) fn local_cookies(&self, state: &State, strict: bool) -> Result<Vec<u64>, ValidationErrors> {
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
}
