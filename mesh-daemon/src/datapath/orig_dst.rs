//! The original destination of a redirected connection, read (and
//! removed) by the proxy's accept loop.

use super::*;

/// Reads and removes original destinations; owned by the proxy's accept loop.
pub struct OrigDstReader {
    pub(super) map: BpfHashMap<MapData, SockAddr, OrigDst>,
}

impl OrigDstReader {
    /// The original destination recorded for a connection from `client`,
    /// removed from the map so the entry cannot be reused. One
    /// `BPF_MAP_LOOKUP_AND_DELETE_ELEM` (kernel 5.14+ for hash maps), or a
    /// lookup and a delete where the kernel refuses it: this runs once per
    /// proxied connection. `client` of either family; an IPv4-mapped one
    /// is its IPv4 address (a dual-stack listener's view of an IPv4 peer).
    pub fn take(&mut self, client: SocketAddr) -> Option<OrigDst> {
        let key = SockAddr::from(client);
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
