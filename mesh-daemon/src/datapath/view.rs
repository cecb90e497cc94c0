//! A read-only view of the pinned maps, opened by pin path with its own
//! file descriptors: counters and the dump are read without waiting for a
//! write that holds the datapath.

use super::*;

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

/// One `SERVICES` entry as the dump shows it; `slot` reads the `SLOTS`
/// entry of a key. A table is read up to the most slots a service can
/// have, whatever count the entry claims (a map written by another build,
/// or damaged): an entry claiming 4 billion slots made the dump loop that
/// often (found by the `kernel_structs` fuzz target).
pub(crate) fn decode_service(
    k: &ServiceKey,
    v: &ServiceValue,
    mut slot: impl FnMut(SlotKey) -> Option<SockAddr>,
) -> ServiceDump {
    let count = if v.mode == MODE_KERNEL { v.slot_count.min(mesh_common::limits::MAX_SLOTS_PER_SERVICE) } else { 0 };
    let slots = (0..count)
        .map(|i| {
            let key = SlotKey { service_id: v.id, generation: u32::from(v.generation), slot: i };
            match slot(key) {
                Some(b) => std::net::SocketAddr::from(b).to_string(),
                None => "(missing)".to_owned(),
            }
        })
        .collect();
    let mode = match v.mode {
        MODE_KERNEL => "kernel",
        MODE_PROXY => "proxy",
        _ => "unknown",
    };
    ServiceDump {
        address: addr(k.vip, k.port_be).to_string(),
        id: v.id,
        mode: mode.to_owned(),
        generation: v.generation,
        slots,
    }
}

/// Read handles of the maps.
pub struct MapsView {
    workloads: BpfHashMap<MapData, u64, WorkloadValue>,
    services: BpfHashMap<MapData, ServiceKey, ServiceValue>,
    slots: BpfHashMap<MapData, SlotKey, SockAddr>,
    stats: PerCpuArray<MapData, u64>,
}

fn pinned(pin_dir: &Path, name: &'static str) -> Result<aya::maps::Map, DatapathError> {
    let err = |source| DatapathError::Map { name, source };
    let data = MapData::from_pin(pin_dir.join(name)).map_err(err)?;
    aya::maps::Map::from_map_data(data).map_err(err)
}

impl MapsView {
    /// Opens the maps pinned in `pin_dir` (after [`Datapath::load`]).
    pub fn open(pin_dir: &Path) -> Result<Self, DatapathError> {
        let hash = |name: &'static str| -> Result<_, DatapathError> {
            let m = pinned(pin_dir, name)?;
            Ok(m)
        };
        let err = |name: &'static str| move |source| DatapathError::Map { name, source };
        Ok(Self {
            workloads: BpfHashMap::try_from(hash(map_names::WORKLOADS)?).map_err(err(map_names::WORKLOADS))?,
            services: BpfHashMap::try_from(hash(map_names::SERVICES)?).map_err(err(map_names::SERVICES))?,
            slots: BpfHashMap::try_from(hash(map_names::SLOTS)?).map_err(err(map_names::SLOTS))?,
            stats: PerCpuArray::try_from(hash(map_names::STATS)?).map_err(err(map_names::STATS))?,
        })
    }

    /// The kernel counters, summed over CPUs. A counter past the end of a
    /// `STATS` map pinned by an older build (fewer counters) reads 0.
    pub fn stats(&self) -> Result<Vec<(Stat, u64)>, DatapathError> {
        Stat::ALL
            .iter()
            .map(|s| match self.stats.get(&(*s as u32), 0) {
                Ok(v) => Ok((*s, v.iter().sum())),
                Err(aya::maps::MapError::OutOfBounds { .. }) => Ok((*s, 0)),
                Err(source) => Err(DatapathError::Map { name: map_names::STATS, source }),
            })
            .collect()
    }

    /// Everything in the maps, decoded.
    pub fn dump(&self) -> Result<Dump, DatapathError> {
        let err = |name| move |source| DatapathError::Map { name, source };
        let mut services = Vec::new();
        for entry in self.services.iter() {
            let (k, v) = entry.map_err(err(map_names::SERVICES))?;
            services.push(decode_service(&k, &v, |key| self.slots.get(&key, 0).ok()));
        }
        services.sort_by(|a, b| a.address.cmp(&b.address));
        let mut workloads = BTreeMap::new();
        for entry in self.workloads.iter() {
            let (cookie, w) = entry.map_err(err(map_names::WORKLOADS))?;
            let mut proxy = addr(Ip::v4(w.proxy_ip4_be), w.proxy_port_be).to_string();
            if !w.proxy_ip6.is_unspecified() {
                proxy = format!("{proxy} {}", addr(w.proxy_ip6, w.proxy_port_be));
            }
            workloads.insert(cookie, proxy);
        }
        let stats = self.stats()?.into_iter().map(|(s, v)| (s.name().to_owned(), v)).collect();
        Ok(Dump { services, workloads, stats })
    }
}
