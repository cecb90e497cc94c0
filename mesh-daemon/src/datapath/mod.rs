//! Loading, attaching and pinning the kernel programs, and keeping their maps
//! equal to the desired state. The only code that writes maps.
//!
//! Maps are pinned under `<pin-dir>/`, links under
//! `<pin-dir>/links-<object id>/` (bpffs holds no regular files, so the
//! folder name says which build attached them). A daemon that starts and
//! finds links pinned by the same kernel object reuses them: no second attach, and the datapath keeps working while no
//! daemon runs. A different object (an upgrade) is attached first, then the
//! old links are dropped.

mod cgroup;
mod contents;
mod netns;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap as BpfHashMap, IterableMap, MapData, PerCpuArray};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SockOps};
use aya::{Ebpf, EbpfLoader};
use mesh_common::{
    link_names, map_names, program_names, OrigDst, ServiceKey, ServiceValue, SlotKey, SockAddrV4, Stat, WorkloadValue,
    MODE_KERNEL, MODE_PROXY,
};
use serde::Serialize;
use tracing::{debug, info, warn};

pub use cgroup::{cgroup2_root, cgroup2_root_in};
pub use contents::{service_key, sockaddr, DesiredService, MapContents};
pub use netns::{netns_cookie, own_netns_cookie};

/// The kernel object, built by build.rs from mesh-ebpf.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Prefix of the folder of pinned links; the object id follows.
const LINKS_DIR_PREFIX: &str = "links-";
const PINNED_MAPS: [&str; 6] = [
    map_names::WORKLOADS,
    map_names::SERVICES,
    map_names::SOCK_ORIG,
    map_names::ORIG_DST,
    map_names::STATS,
    map_names::SLOTS,
];

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("pin directory {path}: {source}")]
    PinDir { path: PathBuf, source: io::Error },
    #[error("pin directory {0} is not on a bpf filesystem; mount one: mount -t bpf bpf /sys/fs/bpf")]
    NotBpffs(PathBuf),
    #[error("cgroup {path}: {source} (give a cgroup2 directory with --cgroup)")]
    Cgroup { path: PathBuf, source: io::Error },
    #[error("loading the kernel programs: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("pinned link {path}: {message}")]
    Link { path: PathBuf, message: String },
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("{0} is missing from the kernel object")]
    Missing(&'static str),
}

pub struct DatapathConfig {
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    /// Highest level the kernel programs log at (aya-log); records above it
    /// are dropped in the kernel. None: logging off.
    pub ebpf_log_level: Option<aya_log::Level>,
}

/// The attached programs and the maps the daemon writes.
pub struct Datapath {
    _ebpf: Ebpf,
    pin_dir: PathBuf,
    /// Pinned links and their pin paths.
    links: Vec<(PathBuf, FdLink)>,
    /// Whether the links were found pinned at start (not attached by us).
    reused: bool,
    workloads: BpfHashMap<MapData, u64, WorkloadValue>,
    services: BpfHashMap<MapData, ServiceKey, ServiceValue>,
    slots: BpfHashMap<MapData, SlotKey, SockAddrV4>,
    stats: PerCpuArray<MapData, u64>,
}

/// Reads and removes original destinations; owned by the proxy's accept loop.
pub struct OrigDstReader {
    map: BpfHashMap<MapData, SockAddrV4, OrigDst>,
}

/// What a sync changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SyncReport {
    pub written: usize,
    pub deleted: usize,
}

/// The maps decoded, for `meshctl datapath dump`.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Dump {
    pub services: Vec<ServiceDump>,
    /// Netns cookie -> proxy address.
    pub workloads: BTreeMap<u64, String>,
    pub stats: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ServiceDump {
    pub address: String,
    pub id: u32,
    pub mode: String,
    pub generation: u8,
    /// Kernel mode: the backend of each slot of the active generation.
    pub slots: Vec<String>,
}

fn hash_map<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<BpfHashMap<MapData, K, V>, DatapathError> {
    let m = ebpf.take_map(name).ok_or(DatapathError::Missing(name))?;
    BpfHashMap::try_from(m).map_err(|source| DatapathError::Map { name, source })
}

/// FNV-1a of the object: tells whether pinned links run this build's code.
fn object_id() -> String {
    let h = OBJECT.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3));
    format!("{h:016x}")
}

fn addr(ip_be: u32, port_be: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(u32::from_be(ip_be)), u16::from_be(port_be))
}

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

        let level = cfg.ebpf_log_level.map_or(0, |l| l as u8);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&cfg.pin_dir)
            .override_global(aya_log::LEVEL, &level, false)
            .load(OBJECT)?;

        let links_dir = cfg.pin_dir.join(format!("{LINKS_DIR_PREFIX}{}", object_id()));
        let names = [link_names::CONNECT4, link_names::SOCKOPS, link_names::GETPEERNAME4];
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
        let stats_map = ebpf.take_map(map_names::STATS).ok_or(DatapathError::Missing(map_names::STATS))?;
        let stats =
            PerCpuArray::try_from(stats_map).map_err(|source| DatapathError::Map { name: map_names::STATS, source })?;
        let dp = Self { _ebpf: ebpf, pin_dir: cfg.pin_dir.clone(), links, reused, workloads, services, slots, stats };
        release_freed_heap();
        Ok((dp, orig))
    }

    /// Whether the programs were found attached at start.
    pub fn reused(&self) -> bool {
        self.reused
    }

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

    /// The kernel counters, summed over CPUs.
    pub fn stats(&self) -> Result<Vec<(Stat, u64)>, DatapathError> {
        Stat::ALL
            .iter()
            .map(|s| {
                let v = self
                    .stats
                    .get(&(*s as u32), 0)
                    .map_err(|source| DatapathError::Map { name: map_names::STATS, source })?;
                Ok((*s, v.iter().sum()))
            })
            .collect()
    }

    /// Everything in the maps, decoded.
    pub fn dump(&self) -> Result<Dump, DatapathError> {
        let err = |name| move |source| DatapathError::Map { name, source };
        let mut services = Vec::new();
        for entry in self.services.iter() {
            let (k, v) = entry.map_err(err(map_names::SERVICES))?;
            let slots = (0..if v.mode == MODE_KERNEL { v.slot_count } else { 0 })
                .map(|i| {
                    let key = SlotKey { service_id: v.id, generation: u32::from(v.generation), slot: i };
                    match self.slots.get(&key, 0) {
                        Ok(b) => addr(b.ip_be, b.port_be).to_string(),
                        Err(_) => "(missing)".to_owned(),
                    }
                })
                .collect();
            let mode = match v.mode {
                MODE_KERNEL => "kernel",
                MODE_PROXY => "proxy",
                _ => "unknown",
            };
            services.push(ServiceDump {
                address: addr(k.vip_be, k.port_be).to_string(),
                id: v.id,
                mode: mode.to_owned(),
                generation: v.generation,
                slots,
            });
        }
        services.sort_by(|a, b| a.address.cmp(&b.address));
        let mut workloads = BTreeMap::new();
        for entry in self.workloads.iter() {
            let (cookie, w) = entry.map_err(err(map_names::WORKLOADS))?;
            workloads.insert(cookie, addr(w.proxy_ip_be, w.proxy_port_be).to_string());
        }
        let stats = self.stats()?.into_iter().map(|(s, v)| (s.name().to_owned(), v)).collect();
        Ok(Dump { services, workloads, stats })
    }

    /// With `cleanup`: detaches the programs and removes every pin. Without:
    /// leaves programs attached and maps pinned, so the datapath keeps
    /// working until a daemon starts again and takes it over.
    pub fn shutdown(self, cleanup: bool) {
        let Datapath { _ebpf, pin_dir, links, workloads, services, slots, stats, .. } = self;
        if !cleanup {
            info!(pin_dir = %pin_dir.display(), "datapath left attached and pinned");
            return;
        }
        for (path, link) in links {
            remove_pin(&path);
            drop(link);
        }
        drop((_ebpf, workloads, services, slots, stats));
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

/// Loads and attaches the three programs; returns their links, in the
/// order connect4, sockops, getpeername4.
fn attach(ebpf: &mut Ebpf, cgroup: &File) -> Result<Vec<FdLink>, DatapathError> {
    let prog = |name: &'static str| move |source| DatapathError::Program { name, source };
    let link = |name: &'static str| move |e: aya::programs::ProgramError| DatapathError::Program { name, source: e };
    let mut out = Vec::new();
    for name in [program_names::CONNECT4, program_names::GETPEERNAME4] {
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

/// The `links-*` folders under the pin dir.
/// Loading parses the kernel's BTF and the object (several MiB, freed
/// once loaded); glibc keeps freed heap mapped, so hand it back: about
/// 3 MiB of the daemon's resident memory.
fn release_freed_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free pages of the allocator's own
    // heap to the kernel; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

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

impl OrigDstReader {
    /// The original destination recorded for a connection from `client`,
    /// removed from the map so the entry cannot be reused. One
    /// `BPF_MAP_LOOKUP_AND_DELETE_ELEM` (kernel 5.14+ for hash maps), or a
    /// lookup and a delete where the kernel refuses it: this runs once per
    /// proxied connection.
    pub fn take(&mut self, client: SocketAddrV4) -> Option<OrigDst> {
        let key = sockaddr(client);
        match lookup_and_delete(self.map.map().fd().as_fd(), &key) {
            Ok(v) => v,
            Err(_) => {
                let v = self.map.get(&key, 0).ok()?;
                let _ = self.map.remove(&key);
                Some(v)
            }
        }
    }
}

/// `BPF_MAP_LOOKUP_AND_DELETE_ELEM`: Ok(None) when the key is absent.
fn lookup_and_delete<K: aya::Pod, V: aya::Pod>(fd: std::os::fd::BorrowedFd<'_>, key: &K) -> io::Result<Option<V>> {
    use std::os::fd::AsRawFd;
    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
    /// The map-element part of `union bpf_attr`.
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let mut value = std::mem::MaybeUninit::<V>::uninit();
    let attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: attr points to a valid, fully initialised ElemAttr for the
    // stated size; key and value point to memory of the map's key and
    // value sizes (K and V are the map's types), the value writable.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            &attr as *const ElemAttr,
            std::mem::size_of::<ElemAttr>(),
        )
    };
    if rc == 0 {
        // SAFETY: the kernel wrote the whole value on success.
        return Ok(Some(unsafe { value.assume_init() }));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENOENT) {
        Ok(None)
    } else {
        Err(e)
    }
}
