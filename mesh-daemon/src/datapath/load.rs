//! Loading the kernel object, attaching and pinning its programs, taking
//! over the pinned ones of the same build, and detaching on uninstall.

use super::*;

impl Datapath {
    /// Loads the object (reusing pinned maps), and attaches and pins the
    /// programs unless links of the same object are pinned already.
    pub fn load(cfg: &DatapathConfig) -> Result<(Self, OrigDstReader), DatapathError> {
        let pin_err = |source| DatapathError::PinDir { path: cfg.pin_dir.clone(), source };
        std::fs::create_dir_all(&cfg.pin_dir).map_err(pin_err)?;
        let fs = nix::sys::statfs::statfs(&cfg.pin_dir).map_err(|e| pin_err(e.into()))?;
        if fs.filesystem_type().0 as i64 != BPF_FS_MAGIC {
            return Err(DatapathError::NotBpffs(cfg.pin_dir.clone()));
        }
        let cgroup =
            File::open(&cfg.cgroup).map_err(|source| DatapathError::Cgroup { path: cfg.cgroup.clone(), source })?;

        unpin_other_layouts(&cfg.pin_dir);
        let level = cfg.ebpf_log_level.map_or(0, |l| l as u8);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&cfg.pin_dir)
            .override_global(aya_log::LEVEL, &level, false)
            .map_max_entries(map_names::SLOTS, cfg.slot_entries)
            .load(OBJECT)?;
        let slots_pin = cfg.pin_dir.join(map_names::SLOTS);
        let slot_capacity = aya::maps::MapInfo::from_pin(&slots_pin)
            .map_err(|source| DatapathError::Map { name: map_names::SLOTS, source })?
            .max_entries();
        if slot_capacity != cfg.slot_entries {
            warn!(
                pinned = slot_capacity,
                flag = cfg.slot_entries,
                "map SLOTS was pinned with another size by an earlier daemon and keeps it; --slot-entries takes effect once a daemon stopped with --cleanup-on-exit (which detaches the datapath) is started again"
            );
        }

        let links_dir = cfg.pin_dir.join(format!("{LINKS_DIR_PREFIX}{}", object_id()));
        let names = [
            link_names::CONNECT4,
            link_names::SOCKOPS,
            link_names::GETPEERNAME4,
            link_names::CONNECT6,
            link_names::GETPEERNAME6,
        ];
        let link_paths: Vec<PathBuf> = names.iter().map(|n| links_dir.join(n)).collect();
        // Links of any build found here: this one's are reused, others replaced.
        let old_dirs = links_dirs(&cfg.pin_dir);
        let old: Vec<(PathBuf, FdLink)> = old_dirs
            .iter()
            .flat_map(|d| names.iter().map(move |n| d.join(n)))
            .filter_map(|p| PinnedLink::from_pin(&p).ok().map(|l| (p, FdLink::from(l))))
            .collect();
        let reused = link_paths.iter().all(|p| old.iter().any(|(q, _)| q == p)) && old.len() == link_paths.len();
        let links = if reused {
            info!(pin_dir = %cfg.pin_dir.display(), "reusing the attached programs pinned there");
            if let Some(prog) = old.first().and_then(|(_, l)| l.info().ok()).map(|i| i.program_id()) {
                spawn_ebpf_logger(aya_log::EbpfLogger::init_from_id(prog));
            }
            old
        } else {
            spawn_ebpf_logger(aya_log::EbpfLogger::init(&mut ebpf));
            let new = attach(&mut ebpf, &cgroup)?;
            std::fs::create_dir_all(&links_dir).map_err(pin_err)?;
            let mut links = Vec::new();
            for (path, link) in link_paths.iter().zip(new) {
                let _ = std::fs::remove_file(path);
                let pinned =
                    link.pin(path).map_err(|e| DatapathError::Link { path: path.clone(), message: e.to_string() })?;
                links.push((path.clone(), FdLink::from(pinned)));
            }
            // The new links run before the old ones go, so no connect is missed.
            for (path, link) in old {
                remove_pin(&path);
                drop(link);
            }
            for d in old_dirs.iter().filter(|d| **d != links_dir) {
                remove_dir_if_empty(d);
            }
            info!(cgroup = %cfg.cgroup.display(), pin_dir = %cfg.pin_dir.display(), "datapath attached");
            links
        };

        let workloads = hash_map(&mut ebpf, map_names::WORKLOADS)?;
        let services = hash_map(&mut ebpf, map_names::SERVICES)?;
        let slots = hash_map(&mut ebpf, map_names::SLOTS)?;
        let orig = OrigDstReader { map: hash_map(&mut ebpf, map_names::ORIG_DST)? };
        let dp = Self {
            _ebpf: ebpf,
            pin_dir: cfg.pin_dir.clone(),
            links,
            reused,
            workloads,
            services,
            slots,
            slot_capacity,
            mirror: None,
        };
        // Loading parses the kernel's BTF and the object (several MiB,
        // freed once loaded): about 3 MiB of the daemon's resident memory.
        crate::heap::release_freed_heap();
        Ok((dp, orig))
    }

    /// Whether the programs were found attached at start.
    pub fn reused(&self) -> bool {
        self.reused
    }

    /// Entries the `SLOTS` map holds.
    pub fn slot_capacity(&self) -> usize {
        self.slot_capacity as usize
    }

    /// With `cleanup`: detaches the programs and removes every pin. Without:
    /// leaves programs attached and maps pinned, so the datapath keeps
    /// working until a daemon starts again and takes it over.
    pub fn shutdown(self, cleanup: bool) {
        let Datapath { _ebpf, pin_dir, links, workloads, services, slots, .. } = self;
        if !cleanup {
            info!(pin_dir = %pin_dir.display(), "datapath left attached and pinned");
            return;
        }
        for (path, link) in links {
            remove_pin(&path);
            drop(link);
        }
        drop((_ebpf, workloads, services, slots));
        for name in PINNED_MAPS {
            remove_pin(&pin_dir.join(name));
        }
        for d in links_dirs(&pin_dir) {
            remove_dir_if_empty(&d);
        }
        remove_dir_if_empty(&pin_dir);
        info!(pin_dir = %pin_dir.display(), "datapath detached and unpinned");
    }
}

/// Loads and attaches the five programs; returns their links, in the
/// order connect4, sockops, getpeername4, connect6, getpeername6.
fn attach(ebpf: &mut Ebpf, cgroup: &File) -> Result<Vec<FdLink>, DatapathError> {
    let prog = |name: &'static str| move |source| DatapathError::Program { name, source };
    let link = |name: &'static str| move |e: aya::programs::ProgramError| DatapathError::Program { name, source: e };
    let mut out = Vec::new();
    let addr_programs =
        [program_names::CONNECT4, program_names::GETPEERNAME4, program_names::CONNECT6, program_names::GETPEERNAME6];
    for name in addr_programs {
        let p: &mut CgroupSockAddr =
            ebpf.program_mut(name).ok_or(DatapathError::Missing(name))?.try_into().map_err(prog(name))?;
        p.load().map_err(prog(name))?;
        // Links on a cgroup always run alongside other programs there; flags
        // must be 0 for bpf_link attachment.
        let id = p.attach(cgroup, CgroupAttachMode::Single).map_err(prog(name))?;
        let l = p.take_link(id).map_err(link(name))?;
        out.push(FdLink::try_from(l).map_err(|e| DatapathError::Link { path: name.into(), message: e.to_string() })?);
    }
    let name = program_names::SOCKOPS;
    let p: &mut SockOps = ebpf.program_mut(name).ok_or(DatapathError::Missing(name))?.try_into().map_err(prog(name))?;
    p.load().map_err(prog(name))?;
    let id = p.attach(cgroup, CgroupAttachMode::Single).map_err(prog(name))?;
    let l = p.take_link(id).map_err(link(name))?;
    out.insert(1, FdLink::try_from(l).map_err(|e| DatapathError::Link { path: name.into(), message: e.to_string() })?);
    Ok(out)
}

/// Unpins each map pinned with a layout other than this build's (see
/// [`LAYOUTS`]), so the load makes it anew. The programs of the build
/// that pinned it keep it until their links are replaced: the
/// connections they redirect meanwhile keep working, but the original
/// destination of one the new proxy accepts in that moment is in the old
/// map (it is closed, counted as `no_orig_dst`).
fn unpin_other_layouts(pin_dir: &Path) {
    for (name, key, value) in LAYOUTS {
        let path = pin_dir.join(name);
        let Ok(info) = aya::maps::MapInfo::from_pin(&path) else { continue };
        let (k, v) = (info.key_size() as usize, info.value_size() as usize);
        if (k, v) != (key, value) {
            warn!(map = name, pinned = ?(k, v), this_build = ?(key, value), "map pinned by an earlier daemon with another layout (key and value sizes); made anew");
            remove_pin(&path);
        }
    }
}

/// The `links-*` folders under the pin dir.
fn links_dirs(pin_dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(pin_dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(LINKS_DIR_PREFIX))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

fn remove_pin(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            warn!(path = %path.display(), error = %e, "cannot remove pin");
        }
    }
}

fn remove_dir_if_empty(dir: &Path) {
    if let Err(e) = std::fs::remove_dir(dir) {
        if e.kind() != io::ErrorKind::NotFound {
            warn!(path = %dir.display(), error = %e, "cannot remove pin directory");
        }
    }
}

/// Forwards the kernel programs' aya-log records to `log`, which the
/// tracing subscriber picks up.
fn spawn_ebpf_logger<T: log::Log + 'static>(logger: Result<aya_log::EbpfLogger<T>, aya_log::Error>) {
    let logger = match logger {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "kernel program logs are not available");
            return;
        }
    };
    // SAFETY: the logger owns the ring buffer's fd and the AsyncFd owns the
    // logger, so the fd stays open for as long as it is registered.
    let registered = unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let Ok(mut fd) = registered else {
        warn!("kernel program logs are not available: cannot poll the log ring");
        return;
    };
    tokio::spawn(async move {
        while let Ok(mut guard) = fd.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}
