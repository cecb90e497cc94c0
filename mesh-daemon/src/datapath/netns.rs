//! Reading the cookie of a network namespace, the key of `WORKLOADS`.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// The cookie the kernel gives the network namespace at `path`
/// (`/var/run/netns/x` or `/proc/<pid>/ns/net`), as `bpf_get_netns_cookie`
/// returns it. Runs on a short-lived thread that enters the namespace, so no
/// other thread's namespace changes.
pub fn netns_cookie(path: &Path) -> io::Result<u64> {
    let ns = File::open(path)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            cookie_of_current_netns()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("netns cookie thread panicked")))
    })
}

fn cookie_of_current_netns() -> io::Result<u64> {
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie and len point to writable memory of the stated size.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The cookie of the calling thread's network namespace.
pub fn own_netns_cookie() -> io::Result<u64> {
    cookie_of_current_netns()
}
