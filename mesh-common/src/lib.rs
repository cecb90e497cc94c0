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

/// The third word of an IPv4-mapped IPv6 address (`::ffff:0:0/96`; the
/// first two are zero), in network order.
pub const MAPPED_BE: u32 = 0xffff_u32.to_be();

/// An IP address of either family, in network order: IPv4 as its
/// IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), the form an `AF_INET6`
/// socket dials it by. One key type serves both families, so connect6
/// looks up a mapped destination as it is, and connect4 with three
/// constant words more.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Ip {
    pub be: [u32; 4],
}

impl Ip {
    /// The IPv4 address `ip_be` (network order).
    #[inline(always)]
    pub const fn v4(ip_be: u32) -> Self {
        Ip { be: [0, 0, MAPPED_BE, ip_be] }
    }

    #[inline(always)]
    pub const fn is_v4(&self) -> bool {
        self.be[0] == 0 && self.be[1] == 0 && self.be[2] == MAPPED_BE
    }

    /// `::`: no address.
    #[inline(always)]
    pub const fn is_unspecified(&self) -> bool {
        self.be[0] == 0 && self.be[1] == 0 && self.be[2] == 0 && self.be[3] == 0
    }
}

/// `WORKLOADS`: key is the workload's network-namespace cookie (`u64`, host
/// order, as `SO_NETNS_COOKIE` and `bpf_get_netns_cookie` return it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WorkloadValue {
    /// Where redirected IPv6 connections go: the node proxy's outbound
    /// listener's IPv6 address; unspecified when it has none.
    pub proxy_ip6: Ip,
    /// Where redirected IPv4 connections go (and IPv4-mapped ones, mapped).
    pub proxy_ip4_be: u32,
    /// The listener's port, the same for both families.
    pub proxy_port_be: u16,
    pub flags: u16,
}

/// `SERVICES` key: a service address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub vip: Ip,
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// `SERVICES` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// Identifies one (service, port, address family) frontend; the proxy
    /// maps it back to the service's endpoints of that family.
    pub id: u32,
    pub mode: u8,
    /// Active `SLOTS` generation (double buffering, kernel mode).
    pub generation: u8,
    pub _pad: u16,
    pub slot_count: u32,
    pub _pad2: u32,
}

/// `SLOTS` key: one slot of one generation of a service's table. The value
/// is the backend, a [`SockAddr`] of the frontend's family.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub service_id: u32,
    pub generation: u32,
    pub slot: u32,
}

/// A socket address of either family; the key of `ORIG_DST` (the client's
/// address as the proxy sees it on accept) and the value of `SLOTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockAddr {
    pub ip: Ip,
    pub port_be: u16,
    pub _pad: u16,
}

/// The destination a redirected connection dialled. Value of `SOCK_ORIG`
/// (keyed by socket cookie, `u64`), of `ORIG_DST` and of the socket
/// storage getpeername reads.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OrigDst {
    pub vip: Ip,
    pub port_be: u16,
    pub _pad: u16,
    pub service_id: u32,
}

#[cfg(feature = "user")]
mod conv {
    use super::{Ip, SockAddr};
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

    impl From<IpAddr> for Ip {
        fn from(ip: IpAddr) -> Self {
            match ip {
                IpAddr::V4(v4) => Ip::v4(u32::from(v4).to_be()),
                IpAddr::V6(v6) => {
                    let o = v6.octets();
                    let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                    Ip { be: [w(0), w(4), w(8), w(12)] }
                }
            }
        }
    }

    impl From<Ip> for IpAddr {
        /// An IPv4-mapped address is the IPv4 address it maps.
        fn from(ip: Ip) -> Self {
            if ip.is_v4() {
                return IpAddr::V4(Ipv4Addr::from(u32::from_be(ip.be[3])));
            }
            let mut o = [0u8; 16];
            for (i, w) in ip.be.iter().enumerate() {
                o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(o))
        }
    }

    impl From<SocketAddr> for SockAddr {
        /// An IPv4-mapped IPv6 socket address is its IPv4 one: the same key.
        fn from(a: SocketAddr) -> Self {
            let ip = match a.ip() {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
                v4 => v4,
            };
            SockAddr { ip: ip.into(), port_be: a.port().to_be(), _pad: 0 }
        }
    }

    impl From<SockAddr> for SocketAddr {
        fn from(a: SockAddr) -> Self {
            SocketAddr::new(a.ip.into(), u16::from_be(a.port_be))
        }
    }
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
    /// connect6: an IPv6 destination (not IPv4-mapped), then looked up as
    /// connect4 looks up its IPv4 address.
    Ipv6 = 15,
    /// connect6: a proxy-mode IPv6 service, but the workload's entry has no
    /// IPv6 address of the proxy; the connection is left untouched.
    NoProxyIpv6 = 16,
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
        Stat::Ipv6,
        Stat::NoProxyIpv6,
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
            Stat::Ipv6 => "ipv6",
            Stat::NoProxyIpv6 => "no_proxy_ipv6",
        }
    }
}

pub const STAT_COUNT: u32 = 17;

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
    unsafe impl aya::Pod for super::SockAddr {}
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
        assert_eq!(size_of::<WorkloadValue>(), 24);
        assert_eq!(size_of::<ServiceKey>(), 20);
        assert_eq!(size_of::<ServiceValue>(), 16);
        assert_eq!(size_of::<SockAddr>(), 20);
        assert_eq!(size_of::<OrigDst>(), 24);
        assert_eq!(size_of::<SlotKey>(), 12);
    }

    #[cfg(feature = "user")]
    #[test]
    fn addresses_convert_both_ways_and_mapped_ones_are_their_ipv4() {
        use core::net::{IpAddr, SocketAddr};
        for s in ["10.96.0.10", "fd00::5", "2001:db8::1:0:0:1", "::"] {
            let ip: IpAddr = s.parse().unwrap();
            assert_eq!(IpAddr::from(Ip::from(ip)), ip, "{s}");
        }
        let v4 = Ip::from("10.96.0.10".parse::<IpAddr>().unwrap());
        assert!(v4.is_v4());
        assert_eq!(v4.be, [0, 0, MAPPED_BE, u32::from_be_bytes([10, 96, 0, 10]).to_be()]);
        // The bytes in memory are the address's, as the kernel keeps them.
        let v6 = Ip::from("fd00::5".parse::<IpAddr>().unwrap());
        assert_eq!(v6.be[0].to_ne_bytes(), [0xfd, 0, 0, 0]);
        assert_eq!(v6.be[3].to_ne_bytes(), [0, 0, 0, 5]);
        assert!(!v6.is_v4());
        let mapped: SocketAddr = "[::ffff:10.1.0.7]:4000".parse().unwrap();
        let plain: SocketAddr = "10.1.0.7:4000".parse().unwrap();
        assert_eq!(SockAddr::from(mapped), SockAddr::from(plain));
        assert_eq!(SocketAddr::from(SockAddr::from(mapped)), plain);
    }

    #[test]
    fn stat_indices_match_their_position() {
        for (i, s) in Stat::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i, "{}", s.name());
        }
    }
}
