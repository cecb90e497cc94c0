//! Kernel programs of the mesh: `cgroup/connect4` catches connects from
//! enrolled network namespaces to service addresses and either balances
//! them in the kernel (slot tables) or sends them to the node proxy;
//! `sockops` hands the original destination to the proxy; `getpeername4`
//! shows the application the address it dialled. `connect6` and
//! `getpeername6` do the same for `AF_INET6` sockets: for IPv6 services,
//! and for an IPv4 service dialled through its IPv4-mapped address
//! (`::ffff:a.b.c.d`), as Java does by default (the kernel then connects
//! over IPv4 without running connect4). Maps key both families alike (see
//! [`Ip`]), so a mapped destination is looked up as it is.
//!
//! Every program allows the connection on any lookup miss: a bug in the mesh
//! must never break a connection that is not meshed.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{bpf_sock_addr, BPF_F_NO_PREALLOC, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB},
    btf_maps::SkStorage,
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval},
    macros::{btf_map, cgroup_sock_addr, map, sock_ops},
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockOpsContext},
    EbpfContext,
};
use aya_log_ebpf::debug;
use mesh_common::{
    limits, Ip, OrigDst, ServiceKey, ServiceValue, SlotKey, SockAddr, Stat, WorkloadValue, IPPROTO_TCP, MODE_KERNEL,
    MODE_PROXY, STAT_COUNT,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// `connect4` verdict: let the connect proceed (possibly rewritten).
const ALLOW: i32 = 1;
/// `connect4` verdict: fail the connect (with the errno set by bpf_set_retval).
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

#[map]
static WORKLOADS: HashMap<u64, WorkloadValue> = HashMap::pinned(limits::MAX_WORKLOADS, 0);

#[map]
static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(limits::MAX_SERVICES, 0);

/// Original destination by socket cookie, from connect4 until the handshake.
#[map]
static SOCK_ORIG: LruHashMap<u64, OrigDst> = LruHashMap::pinned(limits::MAX_SOCK_ORIG, 0);

/// Original destination by the client's (ip, port), read by the proxy.
#[map]
static ORIG_DST: LruHashMap<SockAddr, OrigDst> = LruHashMap::pinned(limits::MAX_ORIG_DST, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(STAT_COUNT, 0);

/// Kernel-mode slot tables: (service id, generation, slot) -> backend.
/// Not preallocated: its memory follows the slots in use (the daemon
/// sizes it with --slot-entries).
#[map]
static SLOTS: HashMap<SlotKey, SockAddr> = HashMap::pinned(limits::MAX_SLOTS, BPF_F_NO_PREALLOC);

/// The service address a socket dialled, for getpeername; freed with the
/// socket.
#[btf_map]
static PEER: SkStorage<OrigDst> = SkStorage::new();

/// The four words of an IPv6 address in a context, one 4-byte load each:
/// the verifier allows no other access to them (a copied array may become
/// a byte loop).
#[inline(always)]
fn read_ip6(words: &[u32; 4]) -> Ip {
    // SAFETY: four aligned u32 fields of a context the kernel passed.
    unsafe {
        Ip {
            be: [
                core::ptr::read_volatile(&words[0]),
                core::ptr::read_volatile(&words[1]),
                core::ptr::read_volatile(&words[2]),
                core::ptr::read_volatile(&words[3]),
            ],
        }
    }
}

/// Writes `ip` over a context's IPv6 address, one 4-byte store each.
#[inline(always)]
fn write_ip6(words: &mut [u32; 4], ip: Ip) {
    // SAFETY: four aligned u32 fields of a context the kernel passed,
    // writable in this program type.
    unsafe {
        core::ptr::write_volatile(&mut words[0], ip.be[0]);
        core::ptr::write_volatile(&mut words[1], ip.be[1]);
        core::ptr::write_volatile(&mut words[2], ip.be[2]);
        core::ptr::write_volatile(&mut words[3], ip.be[3]);
    }
}

#[inline(always)]
fn count(stat: Stat) {
    if let Some(c) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, programs do not migrate while running.
        unsafe { *c += 1 };
    }
}

/// What a connect becomes.
enum Verdict {
    /// Left as it is.
    Keep,
    /// Refused (ECONNREFUSED, set already).
    Refuse,
    /// Sent to this address (of the destination's family) and port
    /// (network order) instead.
    To(Ip, u16),
}

impl Verdict {
    /// The program's return value (the rewrite, if any, done already).
    #[inline(always)]
    fn answer(self) -> i32 {
        match self {
            Verdict::Refuse => REJECT,
            _ => ALLOW,
        }
    }
}

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr for this program type.
    let sa: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
    if sa.protocol != IPPROTO_TCP as u32 {
        count(Stat::NotTcp);
        return ALLOW;
    }
    match connect(&ctx, Ip::v4(sa.user_ip4), sa.user_port as u16) {
        // An IPv4 service's backends and proxy address are IPv4.
        Verdict::To(ip, port) => {
            sa.user_ip4 = ip.be[3];
            sa.user_port = port as u32;
            ALLOW
        }
        v => v.answer(),
    }
}

/// An `AF_INET6` socket's connect: its destination is looked up as it is,
/// an IPv4-mapped one finding the IPv4 service (whose answer is then
/// IPv4, written back mapped: the form the socket needs).
#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr for this program type.
    let sa: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
    if sa.protocol != IPPROTO_TCP as u32 {
        count(Stat::NotTcp);
        return ALLOW;
    }
    let dst = read_ip6(&sa.user_ip6);
    count(if dst.is_v4() { Stat::Ipv4Mapped } else { Stat::Ipv6 });
    match connect(&ctx, dst, sa.user_port as u16) {
        Verdict::To(ip, port) => {
            write_ip6(&mut sa.user_ip6, ip);
            sa.user_port = port as u32;
            ALLOW
        }
        v => v.answer(),
    }
}

/// The decision for a TCP connect to `ip`:`port` (network order), with
/// what it needs recorded: the original destination by socket cookie for
/// the proxy, and in the socket's storage for getpeername.
#[inline(always)]
fn connect(ctx: &SockAddrContext, vip: Ip, port: u16) -> Verdict {
    let key = ServiceKey { vip, port_be: port, proto: IPPROTO_TCP, _pad: 0 };
    // SAFETY: the value is copied out at once; the daemon replaces entries
    // whole, never in place.
    let Some(svc) = (unsafe { SERVICES.get(&key) }).copied() else {
        count(Stat::NotService);
        return Verdict::Keep;
    };
    // SAFETY: helper valid for cgroup_sock_addr programs (kernel >= 5.7).
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once, as above.
    let Some(wl) = (unsafe { WORKLOADS.get(&netns) }).copied() else {
        count(Stat::NotEnrolled);
        return Verdict::Keep;
    };
    let mut orig = OrigDst { vip, port_be: port, _pad: 0, service_id: svc.id };
    let to;
    if svc.mode == MODE_KERNEL {
        if svc.slot_count == 0 {
            count(Stat::NoBackend);
            // SAFETY: helper valid for cgroup programs (kernel >= 5.18).
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            return Verdict::Refuse;
        }
        // SAFETY: helper without preconditions.
        let slot = unsafe { bpf_get_prandom_u32() } % svc.slot_count;
        let slot_key = SlotKey { service_id: svc.id, generation: svc.generation as u32, slot };
        // SAFETY: copied out at once, as above.
        let Some(backend) = (unsafe { SLOTS.get(&slot_key) }).copied() else {
            count(Stat::SlotMissing);
            return Verdict::Keep;
        };
        to = Verdict::To(backend.ip, backend.port_be);
        count(Stat::KernelBalanced);
    } else if svc.mode == MODE_PROXY {
        let proxy = if vip.is_v4() { Ip::v4(wl.proxy_ip4_be) } else { wl.proxy_ip6 };
        if proxy.is_unspecified() {
            count(Stat::NoProxyIpv6);
            return Verdict::Keep;
        }
        // SAFETY: helper valid for cgroup_sock_addr programs (kernel >= 5.7).
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if SOCK_ORIG.insert(&cookie, &orig, 0).is_err() {
            count(Stat::SockOrigFull);
            return Verdict::Keep;
        }
        to = Verdict::To(proxy, wl.proxy_port_be);
        count(Stat::Redirected);
    } else {
        return Verdict::Keep;
    }
    // SAFETY: the context's socket is valid for the program's run.
    let peer = unsafe { PEER.get_or_insert_ptr_mut(ctx, Some(&mut orig)) };
    if !peer.is_null() {
        // SAFETY: non-null storage of this socket, written only here.
        unsafe { *peer = orig };
    }
    debug!(ctx, "service {} mode {} rewritten", svc.id, svc.mode);
    to
}

/// Gives back the service address the socket dialled, not the backend or
/// proxy it was rewritten to.
#[cgroup_sock_addr(getpeername4)]
pub fn mesh_getpeer4(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, |sa, vip| sa.user_ip4 = vip.be[3])
}

/// As getpeername4, for an `AF_INET6` socket: the IPv6 service address, or
/// `::ffff:<vip>` for an IPv4 service dialled by its mapped address.
#[cgroup_sock_addr(getpeername6)]
pub fn mesh_getpeer6(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, |sa, vip| write_ip6(&mut sa.user_ip6, vip))
}

/// Writes the dialled service's address (by `set_ip`, network order) and
/// port over the peer getpeername reports, for a socket connect4 or
/// connect6 rewrote.
#[inline(always)]
fn restore_peer(ctx: &SockAddrContext, set_ip: impl FnOnce(&mut bpf_sock_addr, Ip)) -> i32 {
    // SAFETY: the context's socket is valid for the program's run.
    let peer = unsafe { PEER.get_ptr_mut(ctx) };
    if !peer.is_null() {
        // SAFETY: non-null storage of this socket; the kernel passes a valid
        // bpf_sock_addr for this program type.
        unsafe {
            let sa = &mut *ctx.sock_addr;
            set_ip(sa, (*peer).vip);
            sa.user_port = (*peer).port_be as u32;
        }
        count(Stat::PeerRestored);
    }
    ALLOW
}

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        count(Stat::SockopsOtherOp);
    } else if ctx.family() != AF_INET && ctx.family() != AF_INET6 {
        count(Stat::SockopsNotInet);
    } else {
        established(&ctx);
    }
    1
}

#[inline(always)]
fn established(ctx: &SockOpsContext) {
    // SAFETY: helper valid for sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once; only this program and connect4 write here.
    let Some(orig) = (unsafe { SOCK_ORIG.get(&cookie) }).copied() else {
        count(Stat::SockopsNotRedirected);
        return;
    };
    // The client's address as the proxy's accept sees it: an AF_INET6
    // socket's IPv6 one, which for an IPv4-mapped connect is the mapped
    // form of its IPv4 address: the same key as an AF_INET socket's.
    // SAFETY: the kernel passes a valid bpf_sock_ops for this program type.
    let ip = if ctx.family() == AF_INET { Ip::v4(ctx.local_ip4()) } else { read_ip6(unsafe { &(*ctx.ops).local_ip6 }) };
    let client = SockAddr {
        ip,
        // local_port is in host order, unlike remote_port.
        port_be: (ctx.local_port() as u16).to_be(),
        _pad: 0,
    };
    if ORIG_DST.insert(&client, &orig, 0).is_err() {
        count(Stat::OrigDstFull);
    } else {
        count(Stat::OrigDstStored);
    }
    let _ = SOCK_ORIG.remove(&cookie);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
