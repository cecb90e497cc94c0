//! The daemon's listening sockets: taken from the running daemon when it
//! hands over, else bound anew; and their copies for the next daemon.

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};

use tokio::net::{TcpListener, UnixListener};
use tracing::{info, warn};

use super::args::{listen_set, ListenAddr};
use super::error::{io, RunError};
use super::RunArgs;
use crate::control::api;
use crate::drain::TcpListeners;
use crate::handover::{self, Taken};

/// Names of the listening sockets in a handover; a listener's IPv6 socket
/// is named with `-ipv6` (a daemon before IPv6 hands over no such one).
const OUTBOUND: [&str; 2] = ["outbound", "outbound-ipv6"];
const TUNNEL: [&str; 2] = ["tunnel", "tunnel-ipv6"];
const ADMIN: &str = "admin";
const METRICS: &str = "metrics";
const API: &str = "api";

pub struct Listeners {
    /// One socket per family.
    pub outbound: TcpListeners,
    pub admin: TcpListener,
    /// `--metrics-listen`, when given.
    pub metrics: Option<TcpListener>,
    pub api: UnixListener,
    /// Only with certificates; one socket per family.
    pub tunnel: Option<TcpListeners>,
}

impl Listeners {
    /// Every listener, before the datapath is attached, so nothing is
    /// redirected to a closed port.
    pub async fn open(
        taken: &mut Option<Taken>,
        args: &RunArgs,
        access: &api::Access,
        tunnel: bool,
    ) -> Result<Self, RunError> {
        let outbound = relay_listeners(taken, OUTBOUND, &args.proxy_listen, "--proxy-listen").await?;
        let admin = tcp_listener(taken, ADMIN, args.admin_listen, "--admin-listen").await?;
        let metrics = match args.metrics_listen {
            Some(addr) => Some(tcp_listener(taken, METRICS, addr, "--metrics-listen").await?),
            None => None,
        };
        let api = match taken.as_mut().and_then(|t| t.take(API)) {
            Some(fd) if handover::unix_path(fd.as_fd()).as_deref() == Some(args.api_socket.as_path()) => {
                let l = std::os::unix::net::UnixListener::from(fd);
                let handed = || io(format!("--api-socket {}: the socket handed over", args.api_socket.display()));
                l.set_nonblocking(true).map_err(handed())?;
                info!(socket = %args.api_socket.display(), "control API listening on the socket handed over");
                UnixListener::from_std(l).map_err(handed())?
            }
            _ => api::bind(&args.api_socket, access)?,
        };
        let tunnel = match tunnel {
            true => Some(relay_listeners(taken, TUNNEL, &args.tunnel_listen, "--tunnel-listen").await?),
            false => None,
        };
        Ok(Self { outbound, admin, metrics, api, tunnel })
    }

    /// Copies of each, by name, to hand to the next daemon.
    pub fn copies(&self) -> Result<Vec<(&'static str, OwnedFd)>, RunError> {
        self.copy_fds().map_err(io("copying the listening sockets for the next daemon"))
    }

    fn copy_fds(&self) -> std::io::Result<Vec<(&'static str, OwnedFd)>> {
        let mut copies = Vec::new();
        let named = |names: [&'static str; 2], l: &TcpListeners| -> std::io::Result<Vec<(&'static str, OwnedFd)>> {
            l.sockets
                .iter()
                .map(|s| Ok((names[usize::from(s.local_addr()?.is_ipv6())], s.as_fd().try_clone_to_owned()?)))
                .collect()
        };
        copies.extend(named(OUTBOUND, &self.outbound)?);
        copies.push((ADMIN, self.admin.as_fd().try_clone_to_owned()?));
        if let Some(l) = &self.metrics {
            copies.push((METRICS, l.as_fd().try_clone_to_owned()?));
        }
        copies.push((API, self.api.as_fd().try_clone_to_owned()?));
        if let Some(l) = &self.tunnel {
            copies.extend(named(TUNNEL, l)?);
        }
        Ok(copies)
    }
}

/// The TCP listener named `name` at `addr`: the one the running daemon
/// handed over when it listens there, else a new one.
async fn tcp_listener(
    taken: &mut Option<Taken>,
    name: &str,
    addr: SocketAddr,
    flag: &str,
) -> Result<TcpListener, RunError> {
    if let Some(fd) = taken.as_mut().and_then(|t| t.take(name)) {
        let l = std::net::TcpListener::from(fd);
        match l.local_addr() {
            Ok(a) if a == addr && handover::is_listening(l.as_fd()) => {
                let handed = || io(format!("{flag} {addr}: the socket handed over"));
                l.set_nonblocking(true).map_err(handed())?;
                info!(listener = name, %addr, "listening on the socket handed over");
                return TcpListener::from_std(l).map_err(handed());
            }
            other => {
                warn!(listener = name, handed = ?other.ok(), %flag, %addr, "the running daemon's listener is elsewhere; listening anew")
            }
        }
    }
    bind(addr).map_err(io(format!(
        "{flag} {addr}: cannot listen (if an older mesh-daemon without handover runs on this node, stop it first)"
    )))
}

/// A listening socket at `addr`; an IPv6 one is IPv6 only, so it may
/// share its port with an IPv4 socket on 0.0.0.0.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => {
            let s = tokio::net::TcpSocket::new_v6()?;
            nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Ipv6V6Only, &true)?;
            s
        }
    };
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(1024)
}

/// The relay listeners `given` to `flag` ask for (see [`listen_set`]),
/// named `names` (IPv4, IPv6) in a handover. The implied IPv6 one is left
/// out, with a warning, where the host has no IPv6.
async fn relay_listeners(
    taken: &mut Option<Taken>,
    names: [&str; 2],
    given: &[SocketAddr],
    flag: &str,
) -> Result<TcpListeners, RunError> {
    let mut sockets = Vec::new();
    for ListenAddr { addr, implied } in listen_set(given, flag)? {
        let name = names[usize::from(addr.is_ipv6())];
        match relay_listener(taken, name, addr, flag).await {
            Ok(l) => sockets.push(l),
            Err(e) if implied => {
                warn!(%flag, %addr, error = %e, "no IPv6 listener beside 0.0.0.0 (the host has no IPv6?); IPv6 clients are not served")
            }
            Err(e) => return Err(e),
        }
    }
    Ok(TcpListeners::new(sockets))
}

/// A listener for relayed traffic. Its accepted sockets inherit
/// TCP_NODELAY (no call per connection): small writes such as responses
/// and HTTP/2 WINDOW_UPDATEs must not wait for Nagle and delayed ACKs.
async fn relay_listener(
    taken: &mut Option<Taken>,
    name: &str,
    addr: SocketAddr,
    flag: &str,
) -> Result<TcpListener, RunError> {
    let l = tcp_listener(taken, name, addr, flag).await?;
    nix::sys::socket::setsockopt(&l, nix::sys::socket::sockopt::TcpNoDelay, &true)
        .map_err(|e| RunError::Io { what: format!("{flag} {addr}: setting TCP_NODELAY"), source: e.into() })?;
    Ok(l)
}
