//! Types shared by the kernel programs (mesh-ebpf) and the daemon.
//!
//! Every map key and value is `#[repr(C)]`, explicitly padded (no implicit
//! holes, so a key hashes the same in the kernel and in userspace), and says
//! its byte order in the field name: `*_be` is network order.
#![no_std]

/// Names of the maps, as the kernel programs declare them and as they are
/// pinned under `<pin-dir>/`.
pub mod map_names {
    pub const WORKLOADS: &str = "WORKLOADS";
    pub const SERVICES: &str = "SERVICES";
    pub const SOCK_ORIG: &str = "SOCK_ORIG";
    pub const ORIG_DST: &str = "ORIG_DST";
    pub const STATS: &str = "STATS";
    pub const SLOTS: &str = "SLOTS";
}

/// Where links are pinned, under `<pin-dir>/links/`.
pub mod link_names {
    pub const CONNECT4: &str = "connect4";
    pub const SOCKOPS: &str = "sockops";
    pub const GETPEERNAME4: &str = "getpeername4";
    pub const CONNECT6: &str = "connect6";
    pub const GETPEERNAME6: &str = "getpeername6";
}

/// Names of the kernel programs (at most 15 bytes: the kernel's limit).
pub mod program_names {
    pub const CONNECT4: &str = "mesh_connect4";
    pub const SOCKOPS: &str = "mesh_sockops";
    pub const GETPEERNAME4: &str = "mesh_getpeer4";
    pub const CONNECT6: &str = "mesh_connect6";
    pub const GETPEERNAME6: &str = "mesh_getpeer6";
}

/// Map capacities.
pub mod limits {
    pub const MAX_WORKLOADS: u32 = 4096;
    pub const MAX_SERVICES: u32 = 16384;
    /// Connections between `connect()` and the handshake completing.
    pub const MAX_SOCK_ORIG: u32 = 65536;
    /// Connections accepted by the proxy whose original destination it has not
    /// read yet.
    pub const MAX_ORIG_DST: u32 = 65536;
    /// Slots of one service's table in one generation.
    pub const MAX_SLOTS_PER_SERVICE: u32 = 4096;
    /// All slot entries: both generations of every kernel-mode service.
    pub const MAX_SLOTS: u32 = 262_144;
}

pub const IPPROTO_TCP: u8 = 6;

/// `SERVICES` value `mode`.
pub const MODE_PROXY: u8 = 1;
pub const MODE_KERNEL: u8 = 2;

/// `WORKLOADS`: key is the workload's network-namespace cookie (`u64`, host
/// order, as `SO_NETNS_COOKIE` and `bpf_get_netns_cookie` return it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WorkloadValue {
    /// Where redirected connections go: the node proxy's outbound listener.
    pub proxy_ip_be: u32,
    pub proxy_port_be: u16,
    pub flags: u16,
}

/// `SERVICES` key: a service address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub vip_be: u32,
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// `SERVICES` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// Identifies one (service, port) pair; the proxy maps it back to the
    /// service's endpoints.
    pub id: u32,
    pub mode: u8,
    /// Active `SLOTS` generation (double buffering, kernel mode).
    pub generation: u8,
    pub _pad: u16,
    pub slot_count: u32,
    pub _pad2: u32,
}

/// `SLOTS` key: one slot of one generation of a service's table. The value
/// is the backend, a [`SockAddrV4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub service_id: u32,
    pub generation: u32,
    pub slot: u32,
}

/// An IPv4 socket address, the key of `ORIG_DST`: the client's address as
/// the proxy sees it on accept.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockAddrV4 {
    pub ip_be: u32,
    pub port_be: u16,
    pub _pad: u16,
}

/// The destination a redirected connection dialled. Value of `SOCK_ORIG`
/// (keyed by socket cookie, `u64`) and of `ORIG_DST`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OrigDst {
    pub vip_be: u32,
    pub port_be: u16,
    pub _pad: u16,
    pub service_id: u32,
    pub _pad2: u32,
}

/// Index into the per-CPU `STATS` array. Every early return of a program
/// has one.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// connect4: destination is a service, netns enrolled, sent to the proxy.
    Redirected = 0,
    /// connect4: destination rewritten to a backend in the kernel.
    KernelBalanced = 1,
    /// connect4: kernel-mode service has no backend; the connect is refused
    /// (ECONNREFUSED).
    NoBackend = 2,
    /// connect4: destination is a service, but the netns is not enrolled.
    NotEnrolled = 3,
    /// connect4: destination is not a service (left untouched).
    NotService = 4,
    /// connect4: not TCP (left untouched).
    NotTcp = 5,
    /// connect4: could not record the original destination (map full);
    /// the connection is left untouched.
    SockOrigFull = 6,
    /// sockops: original destination moved to `ORIG_DST`.
    OrigDstStored = 7,
    /// sockops: could not store into `ORIG_DST`.
    OrigDstFull = 8,
    /// getpeername4: the dialled service address was given back.
    PeerRestored = 9,
    /// connect4: slot table entry missing (should not happen); untouched.
    SlotMissing = 10,
    /// sockops: a callback other than an active connection's establishment.
    SockopsOtherOp = 11,
    /// sockops: an established connection of neither IPv4 nor IPv6.
    SockopsNotInet = 12,
    /// sockops: an established connection connect4 (or connect6) did not
    /// redirect.
    SockopsNotRedirected = 13,
    /// connect6: an IPv4-mapped destination (`::ffff:a.b.c.d`) on an
    /// `AF_INET6` socket, then handled as connect4 would (and counted as
    /// such).
    Ipv4Mapped = 14,
    /// connect6: an IPv6 destination, left untouched (IPv6 services are not
    /// meshed).
    NotIpv4Mapped = 15,
}

impl Stat {
    pub const ALL: [Stat; STAT_COUNT as usize] = [
        Stat::Redirected,
        Stat::KernelBalanced,
        Stat::NoBackend,
        Stat::NotEnrolled,
        Stat::NotService,
        Stat::NotTcp,
        Stat::SockOrigFull,
        Stat::OrigDstStored,
        Stat::OrigDstFull,
        Stat::PeerRestored,
        Stat::SlotMissing,
        Stat::SockopsOtherOp,
        Stat::SockopsNotInet,
        Stat::SockopsNotRedirected,
        Stat::Ipv4Mapped,
        Stat::NotIpv4Mapped,
    ];

    /// Stable snake_case name, used in metrics and dumps.
    pub const fn name(self) -> &'static str {
        match self {
            Stat::Redirected => "redirected",
            Stat::KernelBalanced => "kernel_balanced",
            Stat::NoBackend => "no_backend",
            Stat::NotEnrolled => "not_enrolled",
            Stat::NotService => "not_service",
            Stat::NotTcp => "not_tcp",
            Stat::SockOrigFull => "sock_orig_full",
            Stat::OrigDstStored => "orig_dst_stored",
            Stat::OrigDstFull => "orig_dst_full",
            Stat::PeerRestored => "peer_restored",
            Stat::SlotMissing => "slot_missing",
            Stat::SockopsOtherOp => "sockops_other_op",
            Stat::SockopsNotInet => "sockops_not_inet",
            Stat::SockopsNotRedirected => "sockops_not_redirected",
            Stat::Ipv4Mapped => "ipv4_mapped",
            Stat::NotIpv4Mapped => "not_ipv4_mapped",
        }
    }
}

pub const STAT_COUNT: u32 = 16;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all these types are #[repr(C)], Copy, made only of integers,
    // and explicitly padded, so every bit pattern is valid and none has
    // uninitialised bytes.
    unsafe impl aya::Pod for super::WorkloadValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ServiceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ServiceValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockAddrV4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SlotKey {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<WorkloadValue>(), 8);
        assert_eq!(size_of::<ServiceKey>(), 8);
        assert_eq!(size_of::<ServiceValue>(), 16);
        assert_eq!(size_of::<SockAddrV4>(), 8);
        assert_eq!(size_of::<OrigDst>(), 16);
        assert_eq!(size_of::<SlotKey>(), 12);
    }

    #[test]
    fn stat_indices_match_their_position() {
        for (i, s) in Stat::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i, "{}", s.name());
        }
    }
}
