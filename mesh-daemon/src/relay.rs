//! Moving a connection's bytes both ways between the client and the
//! upstream, with half-close kept, and the byte counts kept even when one
//! side fails.
//!
//! Each direction adapts to its traffic, as HAProxy's `splice-auto` does.
//! Reads land in one scratch buffer per thread and are written on in the
//! same poll: small requests and responses cost one `recv` and one `send`,
//! and no buffer is held between reads. Reads from a stream that yields in
//! pieces (a tunnel stream's HTTP/2 frames) are gathered up to the buffer's
//! size first, so that they leave in one `send`, and writes to a tunnel
//! stream are large, so that they leave as full TLS records. Between two
//! TCP sockets, once a read brings [`BULK`] bytes or more the direction is
//! bulk and switches to `splice(2)` through a pipe: the bytes stay in the
//! kernel. A pipe is borrowed from a pool only while bytes are in it and
//! given back empty, so an idle connection holds neither buffer nor pipe,
//! and a new connection makes no `pipe2` call. Only when the destination
//! is full are unwritten bytes kept (at most one scratch buffer).
#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::future::poll_fn;
use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use nix::fcntl::{splice, OFlag, SpliceFFlags};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// One end of a relay: a byte stream, which may be a TCP socket.
pub trait Side: AsyncRead + AsyncWrite + Unpin {
    /// The socket, when this end is plain TCP (then it can be spliced).
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }
}

impl Side for TcpStream {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

/// Bytes moved each way, and how the connection ended.
#[derive(Debug)]
pub struct Transfer {
    /// Client to upstream.
    pub up: u64,
    /// Upstream to client.
    pub down: u64,
    /// The first error of either direction; `None` when both ended with EOF.
    pub error: Option<io::Error>,
}

/// The access log's outcome of a relay: `ok`, `idle` (closed by the idle
/// timeout) or `error`.
pub fn outcome(error: &Option<io::Error>) -> &'static str {
    match error {
        None => "ok",
        Some(e) if e.kind() == io::ErrorKind::TimedOut => "idle",
        Some(_) => "error",
    }
}

/// When a [`Watched`] stream last moved a byte, shared with whoever waits
/// for it to go idle ([`Activity::idle`]).
#[derive(Debug, Clone)]
pub struct Activity {
    base: Instant,
    /// Milliseconds since `base` of the last byte either way.
    last_ms: Arc<AtomicU64>,
}

impl Activity {
    fn touch(&self) {
        self.last_ms.store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn quiet_for(&self) -> Duration {
        let now = self.base.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }

    /// Resolves once no byte has moved either way for `idle`. It wakes
    /// only when the idle time could have passed: progress costs a clock
    /// read, not a timer update.
    pub async fn idle(&self, idle: Duration) {
        loop {
            let left = idle.saturating_sub(self.quiet_for());
            if left.is_zero() {
                return;
            }
            tokio::time::sleep(left).await;
        }
    }
}

/// A byte stream that notes in its [`Activity`] when it last moved a byte.
/// Served by hyper, which owns it, while the [`Activity`] is waited on
/// beside it.
#[derive(Debug)]
pub struct Watched<T> {
    io: T,
    activity: Activity,
}

impl<T> Watched<T> {
    pub fn new(io: T) -> (Self, Activity) {
        let activity = Activity { base: Instant::now(), last_ms: Arc::new(AtomicU64::new(0)) };
        (Self { io, activity: activity.clone() }, activity)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, b);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Relays until both directions reached EOF (each passed on as a write
/// shutdown: half-close), or one failed, which ends both, or no byte
/// moved either way for `idle` (`--idle-timeout`; the error is then
/// `TimedOut`). The caller closes both ends when this returns.
pub async fn relay<A: Side + ?Sized, B: Side + ?Sized>(client: &mut A, upstream: &mut B, idle: Duration) -> Transfer {
    let (mut up, mut down) = (OneWay::default(), OneWay::default());
    // The timer is only looked at when it fires: progress costs a clock
    // read, not a timer update.
    let mut seen = (0, 0);
    let mut progressed = Instant::now();
    let mut timer = std::pin::pin!(tokio::time::sleep_until(progressed + idle));
    let result = poll_fn(|cx| {
        if !up.done {
            ready_or_err(up.poll(cx, &mut *client, &mut *upstream, down.done))?;
        }
        if !down.done {
            ready_or_err(down.poll(cx, &mut *upstream, &mut *client, up.done))?;
        }
        if up.done && down.done {
            return Poll::Ready(Ok(()));
        }
        if (up.moved, down.moved) != seen {
            seen = (up.moved, down.moved);
            progressed = Instant::now();
        }
        while timer.as_mut().poll(cx).is_ready() {
            if progressed.elapsed() >= idle {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no byte moved either way for {idle:?} (--idle-timeout)"),
                )));
            }
            timer.as_mut().reset(progressed + idle);
        }
        Poll::Pending
    })
    .await;
    Transfer { up: up.moved, down: down.moved, error: result.err() }
}

/// Errors out of a direction's poll; Ready(Ok) and Pending both go on.
fn ready_or_err(p: Poll<io::Result<()>>) -> Result<(), io::Error> {
    match p {
        Poll::Ready(Err(e)) => Err(e),
        _ => Ok(()),
    }
}

/// A read of this size or more between two TCP sockets marks the
/// direction as bulk: it is spliced.
const BULK: usize = 16 * 1024;
/// The scratch buffer: the most one read step takes.
const SCRATCH_LEN: usize = 64 * 1024;

thread_local! {
    /// Where reads land before they are written on, in the same poll.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_LEN].into_boxed_slice());
}

const SPLICE_FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_MOVE.union(SpliceFFlags::SPLICE_F_NONBLOCK);

/// The state of one direction.
#[derive(Default)]
struct OneWay {
    /// Bytes that reached the destination.
    moved: u64,
    /// Copied bytes the destination had no room for yet, from `held_from` on.
    held: Vec<u8>,
    held_from: usize,
    /// Spliced bytes not yet written on, in `pipe`.
    pipe: Option<Pipe>,
    in_pipe: usize,
    bulk: bool,
    eof: bool,
    done: bool,
}

impl OneWay {
    /// Moves what `src` has to `dst`; Ready(Ok) once EOF was passed on.
    /// `last`: the other direction is done, so both sockets are closed
    /// right after this one, and a TCP `dst` needs no shutdown (its close
    /// sends the FIN).
    fn poll<S: Side + ?Sized, D: Side + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut S,
        dst: &mut D,
        last: bool,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.poll_flush_held(cx, dst))?;
            if self.eof {
                if !(last && dst.tcp().is_some()) {
                    ready!(poll_shutdown(cx, dst))?;
                }
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            let n = match (self.bulk, src.tcp(), dst.tcp()) {
                (true, Some(s), Some(_)) => ready!(self.poll_splice_in(cx, s))?,
                _ => ready!(self.poll_copy(cx, src, dst))?,
            };
            self.bulk = n >= BULK;
        }
    }

    /// Writes out what is held (copied or spliced); Ready when nothing is.
    fn poll_flush_held<D: Side + ?Sized>(&mut self, cx: &mut Context<'_>, dst: &mut D) -> Poll<io::Result<()>> {
        while self.held_from < self.held.len() {
            let n = ready!(Pin::new(&mut *dst).poll_write(cx, &self.held[self.held_from..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.held_from += n;
            self.moved += n as u64;
        }
        if !self.held.is_empty() {
            // Freed, not kept: idle connections hold no buffer.
            self.held = Vec::new();
            self.held_from = 0;
            ready!(Pin::new(&mut *dst).poll_flush(cx))?;
        }
        while self.in_pipe > 0 {
            let (Some(sock), Some(pipe)) = (dst.tcp(), self.pipe.as_ref()) else {
                return Poll::Ready(Err(io::Error::other("spliced bytes without a socket to write them to")));
            };
            let spliced =
                sock.try_io(Interest::WRITABLE, || Ok(splice(&pipe.r, None, sock, None, self.in_pipe, SPLICE_FLAGS)?));
            match spliced {
                Ok(n) => {
                    self.in_pipe -= n;
                    self.moved += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready!(sock.poll_write_ready(cx))?,
                // A pipe that still holds bytes is closed (dropped with self), not pooled.
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        if let Some(p) = self.pipe.take() {
            p.give_back();
        }
        Poll::Ready(Ok(()))
    }

    /// One read, spliced into a pipe: Ready(Ok(bytes read)); EOF is noted.
    fn poll_splice_in(&mut self, cx: &mut Context<'_>, src: &TcpStream) -> Poll<io::Result<usize>> {
        loop {
            let pipe = Pipe::take()?;
            // The pipe is empty, so EAGAIN can only mean that `src` has
            // nothing to read (with bytes in the pipe it could also mean a
            // full pipe, and waiting for `src` would then hang).
            match src.try_io(Interest::READABLE, || Ok(splice(src, None, &pipe.w, None, pipe.size, SPLICE_FLAGS)?)) {
                Ok(n) => {
                    self.eof = n == 0;
                    self.in_pipe = n;
                    self.pipe = Some(pipe);
                    return Poll::Ready(Ok(n));
                }
                Err(e) => {
                    pipe.give_back();
                    if e.kind() != io::ErrorKind::WouldBlock {
                        return Poll::Ready(Err(e));
                    }
                    ready!(src.poll_read_ready(cx))?;
                }
            }
        }
    }

    /// Reads what `src` has now (up to the scratch buffer) and writes it on
    /// at once; what `dst` has no room for is held. Ready(Ok(bytes read));
    /// EOF is noted.
    fn poll_copy<S: Side + ?Sized, D: Side + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut S,
        dst: &mut D,
    ) -> Poll<io::Result<usize>> {
        SCRATCH.with_borrow_mut(|buf| {
            let mut rb = ReadBuf::new(buf);
            // Gather until `src` has no more now: a TCP read drains the
            // socket at once, a tunnel stream yields a frame at a time.
            while rb.remaining() > 0 {
                let before = rb.filled().len();
                match Pin::new(&mut *src).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) if rb.filled().len() == before => {
                        self.eof = true;
                        break;
                    }
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending if before == 0 => return Poll::Pending,
                    Poll::Pending => break,
                }
            }
            let n = rb.filled().len();
            let mut off = 0;
            while off < n {
                match Pin::new(&mut *dst).poll_write(cx, &buf[off..n]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(m)) => {
                        off += m;
                        self.moved += m as u64;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        self.held = buf[off..n].to_vec();
                        return Poll::Ready(Ok(n));
                    }
                }
            }
            if n > 0 {
                ready!(Pin::new(&mut *dst).poll_flush(cx))?;
            }
            Poll::Ready(Ok(n))
        })
    }
}

/// Passes EOF on; a peer that is already gone needs no telling.
fn poll_shutdown<D: Side + ?Sized>(cx: &mut Context<'_>, dst: &mut D) -> Poll<io::Result<()>> {
    match ready!(Pin::new(dst).poll_shutdown(cx)) {
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Poll::Ready(Ok(())),
        r => Poll::Ready(r),
    }
}

/// A pipe for splicing; only ever pooled empty.
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    /// Bytes it holds at most.
    size: usize,
}

/// Empty pipes kept for reuse; beyond this many they are closed.
const POOL_MAX: usize = 512;
/// Pipes are asked for this size; the kernel may give less (an
/// unprivileged user over `pipe-user-pages-soft`), which only means more
/// `splice` calls.
const PIPE_SIZE: usize = 256 * 1024;
static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

impl Pipe {
    fn take() -> io::Result<Self> {
        if let Some(p) = POOL.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Ok(p);
        }
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        let size = nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as libc::c_int))
            .or_else(|_| nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_GETPIPE_SZ))
            .map(|s| s as usize)
            .unwrap_or(64 * 1024);
        Ok(Self { r, w, size })
    }

    fn give_back(self) {
        let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < POOL_MAX {
            pool.push(self);
        }
    }
}

#[cfg(test)]
mod tests;
