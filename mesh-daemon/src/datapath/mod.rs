//! Loading, attaching and pinning the kernel programs, and keeping their maps
//! equal to the desired state. The only code that writes maps.

mod cgroup;
mod contents;
mod netns;

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SockOps};
use aya::{Ebpf, EbpfLoader};
use mesh_common::{
    map_names, program_names, OrigDst, ServiceKey, ServiceValue, SockAddrV4, Stat, WorkloadValue,
};
use tracing::{debug, info, warn};

pub use cgroup::{cgroup2_root, cgroup2_root_in};
pub use contents::MapContents;
pub use netns::{netns_cookie, own_netns_cookie};

/// The kernel object, built by build.rs from mesh-ebpf.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("pin directory {path}: {source}")]
    PinDir { path: PathBuf, source: io::Error },
    #[error(
        "pin directory {0} is not on a bpf filesystem; mount one: mount -t bpf bpf /sys/fs/bpf"
    )]
    NotBpffs(PathBuf),
    #[error("cgroup {path}: {source} (give a cgroup2 directory with --cgroup)")]
    Cgroup { path: PathBuf, source: io::Error },
    #[error("loading the kernel programs: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("map {0} is missing from the kernel object")]
    MissingMap(&'static str),
}

pub struct DatapathConfig {
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    /// Highest level the kernel programs log at (aya-log); records above it
    /// are dropped in the kernel.
    /// None: logging off.
    pub ebpf_log_level: Option<aya_log::Level>,
}

/// The loaded and attached programs and the maps the daemon writes.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    workloads: BpfHashMap<MapData, u64, WorkloadValue>,
    services: BpfHashMap<MapData, ServiceKey, ServiceValue>,
    stats: PerCpuArray<MapData, u64>,
}

/// Reads and removes original destinations; owned by the proxy's accept loop.
pub struct OrigDstReader {
    map: BpfHashMap<MapData, SockAddrV4, OrigDst>,
}

/// What a sync changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncReport {
    pub written: usize,
    pub deleted: usize,
}

fn map<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<BpfHashMap<MapData, K, V>, DatapathError> {
    let m = ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))?;
    BpfHashMap::try_from(m).map_err(|source| DatapathError::Map { name, source })
}

impl Datapath {
    /// Loads the programs, pins their maps under `pin_dir` and attaches
    /// connect4 and sockops to the cgroup.
    pub fn load(cfg: &DatapathConfig) -> Result<(Self, OrigDstReader), DatapathError> {
        std::fs::create_dir_all(&cfg.pin_dir).map_err(|source| DatapathError::PinDir {
            path: cfg.pin_dir.clone(),
            source,
        })?;
        let fs = nix::sys::statfs::statfs(&cfg.pin_dir).map_err(|e| DatapathError::PinDir {
            path: cfg.pin_dir.clone(),
            source: e.into(),
        })?;
        if fs.filesystem_type().0 as i64 != BPF_FS_MAGIC {
            return Err(DatapathError::NotBpffs(cfg.pin_dir.clone()));
        }
        let cgroup = File::open(&cfg.cgroup).map_err(|source| DatapathError::Cgroup {
            path: cfg.cgroup.clone(),
            source,
        })?;

        let level = cfg.ebpf_log_level.map_or(0, |l| l as u8);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&cfg.pin_dir)
            .override_global(aya_log::LEVEL, &level, false)
            .load(OBJECT)?;
        spawn_ebpf_logger(&mut ebpf);

        let prog = |name: &'static str, source| DatapathError::Program { name, source };
        let connect4: &mut CgroupSockAddr = ebpf
            .program_mut(program_names::CONNECT4)
            .ok_or(DatapathError::MissingMap(program_names::CONNECT4))?
            .try_into()
            .map_err(|e| prog(program_names::CONNECT4, e))?;
        connect4
            .load()
            .map_err(|e| prog(program_names::CONNECT4, e))?;
        // Links on a cgroup always run alongside other programs there; flags
        // must be 0 for bpf_link attachment.
        connect4
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(|e| prog(program_names::CONNECT4, e))?;
        let sockops: &mut SockOps = ebpf
            .program_mut(program_names::SOCKOPS)
            .ok_or(DatapathError::MissingMap(program_names::SOCKOPS))?
            .try_into()
            .map_err(|e| prog(program_names::SOCKOPS, e))?;
        sockops
            .load()
            .map_err(|e| prog(program_names::SOCKOPS, e))?;
        sockops
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(|e| prog(program_names::SOCKOPS, e))?;

        let workloads = map(&mut ebpf, map_names::WORKLOADS)?;
        let services = map(&mut ebpf, map_names::SERVICES)?;
        let orig = OrigDstReader {
            map: map(&mut ebpf, map_names::ORIG_DST)?,
        };
        let stats_map = ebpf
            .take_map(map_names::STATS)
            .ok_or(DatapathError::MissingMap(map_names::STATS))?;
        let stats = PerCpuArray::try_from(stats_map).map_err(|source| DatapathError::Map {
            name: map_names::STATS,
            source,
        })?;
        info!(cgroup = %cfg.cgroup.display(), pin_dir = %cfg.pin_dir.display(), "datapath attached");
        Ok((
            Self {
                ebpf,
                pin_dir: cfg.pin_dir.clone(),
                workloads,
                services,
                stats,
            },
            orig,
        ))
    }

    /// Makes `WORKLOADS` and `SERVICES` equal to `want`, touching only the
    /// entries that differ.
    pub fn sync(&mut self, want: &MapContents) -> Result<SyncReport, DatapathError> {
        let mut report = SyncReport::default();
        sync_map(
            &mut self.workloads,
            map_names::WORKLOADS,
            &want.workloads,
            &mut report,
        )?;
        sync_map(
            &mut self.services,
            map_names::SERVICES,
            &want.services,
            &mut report,
        )?;
        debug!(
            written = report.written,
            deleted = report.deleted,
            "maps synced"
        );
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
                    .map_err(|source| DatapathError::Map {
                        name: map_names::STATS,
                        source,
                    })?;
                Ok((*s, v.iter().sum()))
            })
            .collect()
    }

    /// Detaches the programs (dropping their links) and removes the pins.
    pub fn shutdown(self) {
        let Datapath {
            ebpf,
            pin_dir,
            workloads,
            services,
            stats,
        } = self;
        drop((ebpf, workloads, services, stats));
        for name in [
            map_names::WORKLOADS,
            map_names::SERVICES,
            map_names::SOCK_ORIG,
            map_names::ORIG_DST,
            map_names::STATS,
        ] {
            let path = pin_dir.join(name);
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != io::ErrorKind::NotFound {
                    warn!(path = %path.display(), error = %e, "cannot remove pin");
                }
            }
        }
        remove_dir_if_empty(&pin_dir);
        info!(pin_dir = %pin_dir.display(), "datapath detached and unpinned");
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
fn spawn_ebpf_logger(ebpf: &mut Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "kernel program logs are not available");
            return;
        }
    };
    // SAFETY: the logger owns the ring buffer's fd and the AsyncFd owns the
    // logger, so the fd stays open for as long as it is registered.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
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
    /// removed from the map so the entry cannot be reused.
    pub fn take(&mut self, client: SocketAddrV4) -> Option<OrigDst> {
        let key = SockAddrV4 {
            ip_be: u32::from(*client.ip()).to_be(),
            port_be: client.port().to_be(),
            _pad: 0,
        };
        let v = self.map.get(&key, 0).ok()?;
        let _ = self.map.remove(&key);
        Some(v)
    }
}
