//! Hitless restarts and upgrades: the running daemon hands its listening
//! sockets to the next one over a Unix socket (SCM_RIGHTS), as HAProxy
//! and Envoy's hot restart do.
//!
//! A listening socket is one kernel object: the queue of connections
//! waiting to be accepted belongs to it, not to a process. Passing its
//! descriptor lets the new daemon accept from the same queue, so no
//! connection is refused or lost while daemons change (SO_REUSEPORT would
//! make a second socket with its own queue, and the old queue's
//! connections would need `tcp_migrate_req` to move over).
//!
//! The exchange, on a `SOCK_SEQPACKET` socket (`<state-dir>/handover.sock`
//! by default; the state dir is what both daemons share):
//!
//! 1. the new daemon connects and says `hello` (its build);
//! 2. the old one stops writing the kernel maps and lets go of its
//!    datapath handles (state writes are refused meanwhile), then sends
//!    an `offer` with its listening sockets attached;
//! 3. the new daemon reads the state (final now), takes over the pinned
//!    datapath, serves on the sockets and says `ready`;
//! 4. the old one stops accepting and drains: open connections and
//!    tunnel streams finish, HTTP/2 peers get a GOAWAY, until they are
//!    done or the drain timeout passes.
//!
//! When the new daemon goes away before `ready` (it failed to start), the
//! old one takes its datapath back and serves on as before.
//!
//! Messages are JSON, one per packet; `protocol` is checked on both
//! sides, so daemons of different builds agree or refuse plainly.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Why a handover step failed: what was being done, and why.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("{what}: {message}")]
    Step { what: String, message: String },
    /// The other daemon said something out of turn.
    #[error("{0}")]
    Protocol(String),
    /// The running daemon cannot let go of its datapath.
    #[error("the running daemon cannot let go: {0}")]
    Owner(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Sys(#[from] nix::Error),
}

type Result<T, E = HandoverError> = std::result::Result<T, E>;

/// `.context("doing x")` on any failing step.
trait Context<T> {
    fn context(self, what: &str) -> Result<T, HandoverError>;
    fn with_context(self, what: impl FnOnce() -> String) -> Result<T, HandoverError>;
}

impl<T, E: std::fmt::Display> Context<T> for Result<T, E> {
    fn context(self, what: &str) -> Result<T, HandoverError> {
        self.with_context(|| what.to_owned())
    }
    fn with_context(self, what: impl FnOnce() -> String) -> Result<T, HandoverError> {
        self.map_err(|e| HandoverError::Step { what: what(), message: e.to_string() })
    }
}

macro_rules! bail {
    ($($t:tt)*) => { return Err(HandoverError::Protocol(format!($($t)*))) };
}
use nix::sys::socket::{self as sock, sockopt, AddressFamily, Backlog, MsgFlags, SockFlag, SockType, UnixAddr};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// Version of the exchange; a daemon refuses one it does not speak.
pub const PROTOCOL: u32 = 1;

/// The most listening sockets one offer carries.
const MAX_FDS: usize = 8;

/// How long the old daemon waits for the new one to be ready: reading a
/// state of 10k services and taking over the maps takes about a second.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// Who a daemon is, as the other side logs it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Peer {
    pub protocol: u32,
    pub version: String,
    pub build: String,
    pub pid: u32,
}

impl Peer {
    pub fn this() -> Self {
        Self {
            protocol: PROTOCOL,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            build: build_id(),
            pid: std::process::id(),
        }
    }
}

/// One message of the exchange.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Message {
    Hello(Peer),
    /// The listening sockets, named in the order they are attached.
    Offer {
        from: Peer,
        generation: u64,
        listeners: Vec<String>,
    },
    Refused {
        reason: String,
    },
    Ready,
}

impl Message {
    /// Parses one packet; errors name what was wrong with it.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes).context("a handover message that is not valid JSON of a known kind")
    }
}

/// This executable's identity: the first 16 hex digits of its SHA-256.
/// Two builds of the same version differ here.
pub fn build_id() -> String {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let hash = std::fs::File::open("/proc/self/exe").and_then(|mut f| {
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = std::io::Read::read(&mut f, &mut buf)?;
                if n == 0 {
                    return Ok(ctx.finish());
                }
                ctx.update(&buf[..n]);
            }
        });
        match hash {
            Ok(d) => d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect(),
            Err(_) => "unknown".to_owned(),
        }
    })
    .clone()
}

fn send(fd: &OwnedFd, msg: &Message, fds: &[RawFd]) -> Result<()> {
    let bytes = serde_json::to_vec(msg).context("encoding a handover message")?;
    let iov = [std::io::IoSlice::new(&bytes)];
    let cmsgs: Vec<sock::ControlMessage> =
        if fds.is_empty() { Vec::new() } else { vec![sock::ControlMessage::ScmRights(fds)] };
    sock::sendmsg::<()>(fd.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None).context("sending")?;
    Ok(())
}

/// Receives one message and the descriptors that came with it; `None`
/// when the other side closed.
fn recv(fd: &OwnedFd) -> Result<Option<(Message, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (n, fds, truncated) = {
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let r = sock::recvmsg::<()>(fd.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
            .context("receiving")?;
        let mut fds = Vec::new();
        for c in r.cmsgs().context("reading the attached descriptors")? {
            if let sock::ControlMessageOwned::ScmRights(raw) = c {
                for fd in raw {
                    // SAFETY: SCM_RIGHTS gave this process a new descriptor
                    // that nothing else owns; it is wrapped exactly once.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        (r.bytes, fds, r.flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC))
    };
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    if truncated {
        bail!("a handover message longer than {} bytes or with more than {MAX_FDS} descriptors", buf.len());
    }
    Ok(Some((Message::parse(&buf[..n])?, fds)))
}

fn seqpacket() -> nix::Result<OwnedFd> {
    sock::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)
}

fn set_timeout(fd: &OwnedFd, t: Duration) {
    let tv = nix::sys::time::TimeVal::new(t.as_secs() as _, t.subsec_micros() as _);
    let _ = sock::setsockopt(fd, sockopt::ReceiveTimeout, &tv);
}

/// Listening sockets received from the daemon that ran before.
pub struct Taken {
    conn: OwnedFd,
    pub from: Peer,
    pub generation: u64,
    listeners: Vec<(String, OwnedFd)>,
}

impl Taken {
    /// The listening socket named `name`, if the old daemon had one.
    pub fn take(&mut self, name: &str) -> Option<OwnedFd> {
        let i = self.listeners.iter().position(|(n, _)| n == name)?;
        Some(self.listeners.swap_remove(i).1)
    }

    /// Tells the old daemon to stop accepting and drain.
    pub fn ready(self) -> Result<()> {
        send(&self.conn, &Message::Ready, &[]).context("telling the old daemon the new one is ready")
    }
}

/// Asks the daemon serving at `path` for its listening sockets. `None`
/// when no daemon answers there (none runs, or one of a build without
/// handover: then binding fails while it runs, and says so).
pub fn take_over(path: &Path) -> Result<Option<Taken>> {
    let conn = seqpacket().context("creating the handover socket")?;
    let addr = UnixAddr::new(path).with_context(|| format!("{}: not a usable socket path", path.display()))?;
    match sock::connect(conn.as_raw_fd(), &addr) {
        Ok(()) => {}
        Err(nix::Error::ENOENT | nix::Error::ECONNREFUSED) => return Ok(None),
        Err(e) => {
            return Err(HandoverError::Step {
                what: format!("{}: cannot connect", path.display()),
                message: e.to_string(),
            })
        }
    }
    // The old daemon answers once its datapath is let go: quickly.
    set_timeout(&conn, Duration::from_secs(30));
    let me = Peer::this();
    send(&conn, &Message::Hello(me), &[]).context("saying hello to the running daemon")?;
    match recv(&conn).with_context(|| format!("{}: waiting for the running daemon's offer", path.display()))? {
        Some((Message::Offer { from, generation, listeners }, fds)) => {
            if listeners.len() != fds.len() {
                bail!("the running daemon named {} listeners but sent {} descriptors", listeners.len(), fds.len());
            }
            Ok(Some(Taken { conn, from, generation, listeners: listeners.into_iter().zip(fds).collect() }))
        }
        Some((Message::Refused { reason }, _)) => {
            info!(%reason, "the running daemon does not hand over; binding the listeners here");
            Ok(None)
        }
        Some((other, _)) => bail!("the running daemon answered {other:?} to hello"),
        None => Ok(None),
    }
}

/// What the old daemon does at each step; implemented by `run`.
pub trait Owner: Send + Sync + 'static {
    /// Stops writing the maps and drops the datapath's handles (the pins
    /// keep it); returns the state's generation.
    fn suspend(&self) -> Result<u64>;
    /// The new daemon failed before it was ready: take the datapath back.
    fn resume(&self);
    /// The new daemon serves: stop accepting, drain, exit.
    fn handed_over(&self, to: &Peer);
}

/// The old daemon's side: listens at the handover path and holds a copy
/// of every listening socket to pass on.
pub struct Server {
    path: PathBuf,
    listen: OwnedFd,
    held: Mutex<Vec<(String, OwnedFd)>>,
    closed: AtomicBool,
}

impl Server {
    /// Listens at `path`, replacing a stale socket there (the caller has
    /// already asked it for a handover, or nothing answered).
    pub fn bind(path: &Path) -> Result<Arc<Self>> {
        let listen = seqpacket().context("creating the handover socket")?;
        let addr = UnixAddr::new(path).with_context(|| format!("{}: not a usable socket path", path.display()))?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing the old {}", path.display()))
            }
            _ => {}
        }
        sock::bind(listen.as_raw_fd(), &addr).with_context(|| format!("{}: cannot bind", path.display()))?;
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        sock::listen(&listen, Backlog::new(4).expect("a small backlog"))?;
        // accept() wakes up this often to see whether the server closed.
        set_timeout(&listen, Duration::from_millis(250));
        Ok(Arc::new(Self {
            path: path.to_owned(),
            listen,
            held: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
        }))
    }

    /// Keeps `fd`, a copy of a listening socket, to hand over as `name`.
    pub fn hold(&self, name: &str, fd: OwnedFd) {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).push((name.to_owned(), fd));
    }

    /// Stops handing over and drops the copies, so the listening sockets
    /// close with the daemon's own (a drain without a successor refuses
    /// new connections at once instead of queueing them).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.held.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Serves handover requests on a thread of its own until closed or
    /// handed over.
    pub fn spawn(self: &Arc<Self>, owner: Arc<dyn Owner>) {
        let me = self.clone();
        let r = std::thread::Builder::new().name("handover".into()).spawn(move || me.serve(&*owner));
        if let Err(e) = r {
            warn!(error = %e, "cannot start the handover thread; a new daemon cannot take over without a gap");
        }
    }

    fn serve(&self, owner: &dyn Owner) {
        self.serve_until_done(owner);
        // Later connects are refused at once rather than left unanswered.
        let _ = sock::shutdown(self.listen.as_raw_fd(), sock::Shutdown::Both);
    }

    fn serve_until_done(&self, owner: &dyn Owner) {
        while !self.closed.load(Ordering::Acquire) {
            let conn = match sock::accept(self.listen.as_raw_fd()) {
                // SAFETY: accept returned a new descriptor that nothing else owns.
                Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
                Err(nix::Error::EAGAIN | nix::Error::EINTR) => continue,
                Err(e) => {
                    warn!(error = %e, socket = %self.path.display(), "handover socket failed; no more handovers");
                    return;
                }
            };
            set_timeout(&conn, Duration::from_secs(5));
            match self.exchange(&conn, owner) {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => warn!(error = format!("{e:#}"), "a handover did not complete"),
            }
        }
    }

    /// One exchange; true when the new daemon took over.
    fn exchange(&self, conn: &OwnedFd, owner: &dyn Owner) -> Result<bool> {
        let to = match recv(conn)? {
            Some((Message::Hello(peer), _)) => peer,
            Some((other, _)) => bail!("expected hello, got {other:?}"),
            None => return Ok(false),
        };
        let refuse = |reason: String| {
            warn!(to_pid = to.pid, %reason, "refusing a handover");
            let _ = send(conn, &Message::Refused { reason }, &[]);
            Ok(false)
        };
        if to.protocol != PROTOCOL {
            return refuse(format!(
                "handover protocol {} is not this daemon's {PROTOCOL}; stop this daemon first (its connections are cut)",
                to.protocol
            ));
        }
        if self.closed.load(Ordering::Acquire) {
            return refuse("this daemon is draining; its listeners are closed".to_owned());
        }
        let from = Peer::this();
        info!(to_pid = to.pid, to_build = %to.build, to_version = %to.version, build = %from.build, "a new daemon asks to take over");
        let generation = match owner.suspend() {
            Ok(g) => g,
            Err(e) => return refuse(format!("{e:#}")),
        };
        let (names, fds): (Vec<String>, Vec<RawFd>) = {
            let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            held.iter().map(|(n, fd)| (n.clone(), fd.as_raw_fd())).unzip()
        };
        let offer = Message::Offer { from, generation, listeners: names };
        if let Err(e) = send(conn, &offer, &fds) {
            owner.resume();
            return Err(e);
        }
        set_timeout(conn, READY_WITHIN);
        match recv(conn) {
            Ok(Some((Message::Ready, _))) => {
                info!(to_pid = to.pid, "handed over: the new daemon serves");
                self.close();
                owner.handed_over(&to);
                Ok(true)
            }
            other => {
                let why = match other {
                    Ok(None) => "it went away".to_owned(),
                    Ok(Some((m, _))) => format!("it said {m:?}"),
                    Err(e) => format!("{e:#}"),
                };
                warn!(to_pid = to.pid, reason = %why, "the new daemon did not become ready; serving on");
                owner.resume();
                Ok(false)
            }
        }
    }
}

/// A Unix socket's path, to tell whether a received listener is the one
/// a flag names.
pub fn unix_path(fd: BorrowedFd<'_>) -> Option<PathBuf> {
    let a: UnixAddr = sock::getsockname(fd.as_raw_fd()).ok()?;
    a.path().map(|p| PathBuf::from(std::ffi::OsStr::from_bytes(p.as_os_str().as_bytes())))
}

/// Whether `fd` is a listening socket (SO_ACCEPTCONN).
pub fn is_listening(fd: BorrowedFd<'_>) -> bool {
    sock::getsockopt(&fd.as_fd(), sockopt::AcceptConn).unwrap_or(false)
}

#[cfg(test)]
// The tests drive both daemons' sides from plain threads.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    struct Recorder {
        events: Mutex<Vec<String>>,
    }

    impl Owner for Recorder {
        fn suspend(&self) -> Result<u64> {
            self.events.lock().unwrap().push("suspend".into());
            Ok(7)
        }
        fn resume(&self) {
            self.events.lock().unwrap().push("resume".into());
        }
        fn handed_over(&self, to: &Peer) {
            self.events.lock().unwrap().push(format!("handed over to {}", to.pid));
        }
    }

    fn wait_for(rec: &Recorder, n: usize) -> Vec<String> {
        for _ in 0..200 {
            let e = rec.events.lock().unwrap().clone();
            if e.len() >= n {
                return e;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        rec.events.lock().unwrap().clone()
    }

    #[test]
    fn a_listener_handed_over_keeps_its_queued_connections() {
        let dir = std::env::temp_dir().join(format!("mesh-handover-{}", std::process::id()));
        let path = dir.join("handover.sock");
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let server = Server::bind(&path).unwrap();
        server.hold("outbound", tcp.as_fd().try_clone_to_owned().unwrap());
        let rec = Arc::new(Recorder { events: Mutex::new(Vec::new()) });
        server.spawn(rec.clone());

        // A first successor that goes away before it is ready: the old
        // daemon takes its datapath back.
        let failed = take_over(&path).unwrap().expect("an offer");
        assert_eq!(failed.generation, 7);
        drop(failed);
        assert_eq!(wait_for(&rec, 2), ["suspend", "resume"]);

        // A connection waits in the queue while daemons change.
        let queued = std::net::TcpStream::connect(addr).unwrap();
        drop(tcp);
        let mut taken = take_over(&path).unwrap().expect("an offer");
        assert_eq!(taken.from.pid, std::process::id());
        let fd = taken.take("outbound").expect("the outbound listener");
        assert!(is_listening(fd.as_fd()));
        assert!(taken.take("tunnel").is_none());
        taken.ready().unwrap();
        assert_eq!(wait_for(&rec, 4)[2..], ["suspend".to_owned(), format!("handed over to {}", std::process::id())]);
        let listener = std::net::TcpListener::from(fd);
        let (accepted, peer) = listener.accept().unwrap();
        assert_eq!(peer, queued.local_addr().unwrap(), "the connection made before the handover");
        drop(accepted);

        // The server closed: nothing answers at the path any more.
        std::thread::sleep(Duration::from_millis(300));
        assert!(take_over(&path).unwrap().is_none(), "a daemon that handed over offers nothing more");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn nothing_listening_means_no_handover() {
        let path = std::env::temp_dir().join(format!("mesh-handover-none-{}.sock", std::process::id()));
        assert!(take_over(&path).unwrap().is_none());
    }

    #[test]
    fn messages_of_another_protocol_or_kind_are_named() {
        let hello = Message::Hello(Peer { protocol: 9, version: "9.0.0".into(), build: "x".into(), pid: 1 });
        let bytes = serde_json::to_vec(&hello).unwrap();
        assert_eq!(Message::parse(&bytes).unwrap(), hello);
        assert!(Message::parse(b"{\"nope\":1}").is_err());
        assert!(Message::parse(b"\xff").is_err());
    }
}
