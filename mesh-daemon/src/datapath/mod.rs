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
mod load;
mod netns;
mod orig_dst;
mod sync;
mod view;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::mem::size_of;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap as BpfHashMap, IterableMap, MapData, PerCpuArray};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SockOps};
use aya::{Ebpf, EbpfLoader};
use mesh_common::{
    link_names, map_names, program_names, Ip, OrigDst, ServiceKey, ServiceValue, SlotKey, SockAddr, Stat,
    WorkloadValue, MODE_KERNEL, MODE_PROXY,
};
use serde::Serialize;
use tracing::{debug, info, warn};

pub use cgroup::cgroup2_root;
pub use contents::MapContents;
pub use netns::{netns_cookie, own_netns_cookie};
pub use orig_dst::OrigDstReader;
pub use sync::SyncReport;
#[cfg(feature = "fuzzing")]
pub(crate) use view::decode_service;
pub use view::{Dump, MapsView};

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

/// Key and value sizes of the maps whose layout a build may change, as
/// this build lays them out. A map pinned with another layout (by a
/// daemon before IPv6, whose keys held 4-byte addresses) cannot serve
/// this build's programs: it is unpinned and made anew.
const LAYOUTS: [(&str, usize, usize); 5] = [
    (map_names::WORKLOADS, size_of::<u64>(), size_of::<WorkloadValue>()),
    (map_names::SERVICES, size_of::<ServiceKey>(), size_of::<ServiceValue>()),
    (map_names::SOCK_ORIG, size_of::<u64>(), size_of::<OrigDst>()),
    (map_names::ORIG_DST, size_of::<SockAddr>(), size_of::<OrigDst>()),
    (map_names::SLOTS, size_of::<SlotKey>(), size_of::<SockAddr>()),
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

#[derive(Clone)]
pub struct DatapathConfig {
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    /// Highest level the kernel programs log at (aya-log); records above it
    /// are dropped in the kernel. None: logging off.
    pub ebpf_log_level: Option<aya_log::Level>,
    /// Entries of `SLOTS` (`--slot-entries`), when it is created; a map
    /// pinned by an earlier daemon keeps its size.
    pub slot_entries: u32,
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
    slots: BpfHashMap<MapData, SlotKey, SockAddr>,
    /// Entries `SLOTS` holds, as loaded.
    slot_capacity: u32,
    /// What the maps hold, as last synced; None: read them first.
    mirror: Option<sync::Mirror>,
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

/// `ip`, `port_be` as a socket address (IPv4 for an IPv4-mapped `ip`).
fn addr(ip: Ip, port_be: u16) -> SocketAddr {
    SocketAddr::from(SockAddr { ip, port_be, _pad: 0 })
}
