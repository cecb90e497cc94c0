//! Kernel programs of the mesh: `cgroup/connect4` catches connects from
//! enrolled network namespaces to service addresses and either balances
//! them in the kernel (slot tables) or sends them to the node proxy;
//! `sockops` hands the original destination to the proxy; `getpeername4`
//! shows the application the address it dialled. `connect6` and
//! `getpeername6` do the same for an `AF_INET6` socket dialling an IPv4
//! service through its IPv4-mapped address (`::ffff:a.b.c.d`), as Java does
//! by default: the kernel then connects over IPv4 without running
//! connect4.
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
    limits, OrigDst, ServiceKey, ServiceValue, SlotKey, SockAddrV4, Stat, WorkloadValue, IPPROTO_TCP, MODE_KERNEL,
    MODE_PROXY, STAT_COUNT,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// The third word of an IPv4-mapped IPv6 address (`::ffff:0:0/96`, the
/// first two are zero), in network order.
const MAPPED: u32 = 0xffff_u32.to_be();
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
static ORIG_DST: LruHashMap<SockAddrV4, OrigDst> = LruHashMap::pinned(limits::MAX_ORIG_DST, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(STAT_COUNT, 0);

/// Kernel-mode slot tables: (service id, generation, slot) -> backend.
/// Not preallocated: its memory follows the slots in use (the daemon
/// sizes it with --slot-entries).
#[map]
static SLOTS: HashMap<SlotKey, SockAddrV4> = HashMap::pinned(limits::MAX_SLOTS, BPF_F_NO_PREALLOC);

/// The service address a socket dialled, for getpeername; freed with the
/// socket.
#[btf_map]
static PEER: SkStorage<OrigDst> = SkStorage::new();

#[inline(always)]
fn count(stat: Stat) {
    if let Some(c) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, programs do not migrate while running.
        unsafe { *c += 1 };
    }
}

/// What a connect to an IPv4 address becomes.
enum Verdict {
    /// Left as it is.
    Keep,
    /// Refused (ECONNREFUSED, set already).
    Refuse,
    /// Sent to this address and port (network order) instead.
    To(u32, u16),
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
    match connect(&ctx, sa.user_ip4, sa.user_port as u16) {
        Verdict::To(ip, port) => {
            sa.user_ip4 = ip;
            sa.user_port = port as u32;
            ALLOW
        }
        v => v.answer(),
    }
}

/// An `AF_INET6` socket's connect: an IPv4-mapped destination is handled
/// as connect4 handles its IPv4 address, and rewritten to the mapped form
/// of the answer. Any other IPv6 destination is left alone.
#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr for this program type.
    let sa: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
    if sa.protocol != IPPROTO_TCP as u32 {
        count(Stat::NotTcp);
        return ALLOW;
    }
    if sa.user_ip6[0] != 0 || sa.user_ip6[1] != 0 || sa.user_ip6[2] != MAPPED {
        count(Stat::NotIpv4Mapped);
        return ALLOW;
    }
    count(Stat::Ipv4Mapped);
    match connect(&ctx, sa.user_ip6[3], sa.user_port as u16) {
        Verdict::To(ip, port) => {
            sa.user_ip6[3] = ip;
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
fn connect(ctx: &SockAddrContext, ip: u32, port: u16) -> Verdict {
    let key = ServiceKey { vip_be: ip, port_be: port, proto: IPPROTO_TCP, _pad: 0 };
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
    let mut orig = OrigDst { vip_be: key.vip_be, port_be: key.port_be, _pad: 0, service_id: svc.id, _pad2: 0 };
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
        to = Verdict::To(backend.ip_be, backend.port_be);
        count(Stat::KernelBalanced);
    } else if svc.mode == MODE_PROXY {
        // SAFETY: helper valid for cgroup_sock_addr programs (kernel >= 5.7).
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if SOCK_ORIG.insert(&cookie, &orig, 0).is_err() {
            count(Stat::SockOrigFull);
            return Verdict::Keep;
        }
        to = Verdict::To(wl.proxy_ip_be, wl.proxy_port_be);
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
    restore_peer(&ctx, |sa, vip_be| sa.user_ip4 = vip_be)
}

/// As getpeername4, for an `AF_INET6` socket that dialled a service's
/// IPv4-mapped address (only those have the storage): `::ffff:<vip>`.
#[cgroup_sock_addr(getpeername6)]
pub fn mesh_getpeer6(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, |sa, vip_be| sa.user_ip6 = [0, 0, MAPPED, vip_be])
}

/// Writes the dialled service's address (by `set_ip`, network order) and
/// port over the peer getpeername reports, for a socket connect4 or
/// connect6 rewrote.
#[inline(always)]
fn restore_peer(ctx: &SockAddrContext, set_ip: impl FnOnce(&mut bpf_sock_addr, u32)) -> i32 {
    // SAFETY: the context's socket is valid for the program's run.
    let peer = unsafe { PEER.get_ptr_mut(ctx) };
    if !peer.is_null() {
        // SAFETY: non-null storage of this socket; the kernel passes a valid
        // bpf_sock_addr for this program type.
        unsafe {
            let sa = &mut *ctx.sock_addr;
            set_ip(sa, (*peer).vip_be);
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
        // An AF_INET6 socket is found in SOCK_ORIG only when connect6
        // redirected its IPv4-mapped connect: an IPv4 connection, whose
        // local address is its IPv4 one.
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
    let client = SockAddrV4 {
        ip_be: ctx.local_ip4(),
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
