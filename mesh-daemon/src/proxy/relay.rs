//! Moving a connection's bytes both ways between the client and the
//! upstream, with half-close kept, and the byte counts kept even when one
//! side fails.
//!
//! TCP to TCP adapts to the traffic, as HAProxy's `splice-auto` does. Small
//! reads (requests, responses) are copied through one scratch buffer per
//! thread, written out in the same step: one `recv` and one `send`, and no
//! buffer held between reads. Once a read fills the scratch buffer the
//! direction is bulk and switches to `splice(2)` through a pipe: the bytes
//! stay in the kernel, no copy through the proxy. A pipe is borrowed from a
//! pool only while bytes are in it and given back empty, so an idle
//! connection holds neither buffer nor pipe, and a new connection makes no
//! `pipe2` call. Only when the destination is full are the unwritten bytes
//! of a copy kept (at most one scratch buffer). Anything else (a tunnel
//! stream) is copied through tokio's buffers.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io;
use std::os::fd::OwnedFd;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::task::{ready, Context, Poll};

use nix::fcntl::{splice, OFlag, SpliceFFlags};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

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

/// Relays between two TCP sockets until both directions reached EOF, or
/// one failed.
pub async fn tcp_both(client: &mut TcpStream, upstream: &mut TcpStream) -> Transfer {
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let (client_r, client_w) = client.split();
    let (upstream_r, upstream_w) = upstream.split();
    let error = both(OneWay::new(client_r, upstream_w, &up), OneWay::new(upstream_r, client_w, &down)).await.err();
    Transfer { up: up.into_inner(), down: down.into_inner(), error }
}

/// Relays between any two byte streams through tokio's copy buffers.
pub async fn copy_both<A, B>(client: &mut A, upstream: &mut B) -> Transfer
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut client = Counted::new(client);
    let mut upstream = Counted::new(upstream);
    let error = tokio::io::copy_bidirectional(&mut client, &mut upstream).await.err();
    // Bytes written to a side are the bytes that reached it.
    Transfer { up: upstream.written, down: client.written, error }
}

/// Drives both directions in one task: a direction that ends with EOF lets
/// the other go on (half-close); the first error ends both.
async fn both(a: impl Future<Output = io::Result<()>>, b: impl Future<Output = io::Result<()>>) -> io::Result<()> {
    let (mut a, mut b) = (pin!(a), pin!(b));
    let (mut a_done, mut b_done) = (false, false);
    poll_fn(|cx| {
        if !a_done {
            if let Poll::Ready(r) = a.as_mut().poll(cx) {
                r?;
                a_done = true;
            }
        }
        if !b_done {
            if let Poll::Ready(r) = b.as_mut().poll(cx) {
                r?;
                b_done = true;
            }
        }
        if a_done && b_done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await
}

/// A read of this size or more marks a direction as bulk: it is spliced.
const SCRATCH_LEN: usize = 16 * 1024;

thread_local! {
    /// Where small reads land before they are written on, in the same poll.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_LEN].into_boxed_slice());
}

const SPLICE_FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_MOVE.union(SpliceFFlags::SPLICE_F_NONBLOCK);

/// One direction: `src` to `dst` until EOF, which is passed on as a write
/// shutdown of `dst`. Bytes that reached `dst` are added to `moved`.
struct OneWay<'a> {
    src: ReadHalf<'a>,
    dst: WriteHalf<'a>,
    moved: &'a AtomicU64,
    /// Copied bytes `dst` had no room for yet, from `held_from` on.
    held: Vec<u8>,
    held_from: usize,
    /// Spliced bytes not yet written on, in `pipe`.
    pipe: Option<Pipe>,
    in_pipe: usize,
    bulk: bool,
    eof: bool,
}

impl<'a> OneWay<'a> {
    fn new(src: ReadHalf<'a>, dst: WriteHalf<'a>, moved: &'a AtomicU64) -> Self {
        Self { src, dst, moved, held: Vec::new(), held_from: 0, pipe: None, in_pipe: 0, bulk: false, eof: false }
    }

    fn count(&self, n: usize) {
        self.moved.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Writes out what is held (copied or spliced); Ready when nothing is.
    fn poll_flush_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.held_from < self.held.len() {
            let n = ready!(Pin::new(&mut self.dst).poll_write(cx, &self.held[self.held_from..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.held_from += n;
            self.count(n);
        }
        if !self.held.is_empty() {
            // Freed, not kept: idle connections hold no buffer.
            self.held = Vec::new();
            self.held_from = 0;
        }
        while self.in_pipe > 0 {
            let (dst, pipe) = (self.dst.as_ref(), self.pipe.as_ref().ok_or(io::ErrorKind::Other)?);
            match dst.try_io(Interest::WRITABLE, || Ok(splice(&pipe.r, None, dst, None, self.in_pipe, SPLICE_FLAGS)?)) {
                Ok(n) => {
                    self.in_pipe -= n;
                    self.count(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready!(dst.poll_write_ready(cx))?,
                // A pipe that still holds bytes is closed (dropped with self), not pooled.
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        if let Some(p) = self.pipe.take() {
            p.give_back();
        }
        Poll::Ready(Ok(()))
    }

    /// One read, spliced into a pipe: Ready(Ok(bytes read)), 0 at EOF.
    fn poll_splice_in(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let src = self.src.as_ref();
        loop {
            let pipe = Pipe::take()?;
            // The pipe is empty, so EAGAIN can only mean that `src` has
            // nothing to read (with bytes in the pipe it could also mean a
            // full pipe, and waiting for `src` would then hang).
            match src.try_io(Interest::READABLE, || Ok(splice(src, None, &pipe.w, None, pipe.size, SPLICE_FLAGS)?)) {
                Ok(n) => {
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

    /// One read into the scratch buffer, written on at once; what `dst`
    /// has no room for is held. Ready(Ok(bytes read)), 0 at EOF.
    fn poll_copy(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        SCRATCH.with_borrow_mut(|buf| {
            let mut rb = ReadBuf::new(buf);
            ready!(Pin::new(&mut self.src).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            let mut off = 0;
            while off < n {
                match Pin::new(&mut self.dst).poll_write(cx, &buf[off..n]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(m)) => {
                        off += m;
                        self.count(m);
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        self.held = buf[off..n].to_vec();
                        break;
                    }
                }
            }
            Poll::Ready(Ok(n))
        })
    }
}

impl Future for OneWay<'_> {
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            ready!(this.poll_flush_held(cx))?;
            if this.eof {
                return Poll::Ready(shutdown_write(this.dst.as_ref()));
            }
            let n = ready!(if this.bulk { this.poll_splice_in(cx) } else { this.poll_copy(cx) })?;
            this.eof = n == 0;
            this.bulk = n >= SCRATCH_LEN;
        }
    }
}

fn shutdown_write(s: &TcpStream) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    match nix::sys::socket::shutdown(s.as_raw_fd(), nix::sys::socket::Shutdown::Write) {
        // The peer is already gone: nothing left to tell it.
        Ok(()) | Err(nix::errno::Errno::ENOTCONN) => Ok(()),
        Err(e) => Err(e.into()),
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

/// Counts the bytes written to a stream.
struct Counted<'a, T: ?Sized> {
    inner: &'a mut T,
    written: u64,
}

impl<'a, T: ?Sized> Counted<'a, T> {
    fn new(inner: &'a mut T) -> Self {
        Self { inner, written: 0 }
    }
}

impl<T: AsyncRead + Unpin + ?Sized> AsyncRead for Counted<'_, T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin + ?Sized> AsyncWrite for Counted<'_, T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut *self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.written += n as u64;
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair on loopback: (the side the test holds, the side the relay holds).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn tcp_relay_moves_every_byte_both_ways_and_passes_half_close_on() {
        let (mut client, mut client_side) = pair().await;
        let (mut upstream_side, mut server) = pair().await;
        let relay = tokio::spawn(async move { tcp_both(&mut client_side, &mut upstream_side).await });
        // 3 MiB up while the server sends 5 MiB down, then the client
        // half-closes and still receives everything.
        let up: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..5 << 20).map(|i| (i % 241) as u8).collect();
        let (up2, down2) = (up.clone(), down.clone());
        let server_task = tokio::spawn(async move {
            let (mut r, mut w) = server.split();
            let send = async {
                w.write_all(&down2).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            let recv = async { r.read_to_end(&mut got).await.unwrap() };
            tokio::join!(send, recv);
            assert_eq!(got, up2, "the server got every byte the client sent, then EOF");
        });
        let (mut r, mut w) = client.split();
        let send = async {
            w.write_all(&up).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let recv = async { r.read_to_end(&mut got).await.unwrap() };
        tokio::join!(send, recv);
        assert_eq!(got, down);
        server_task.await.unwrap();
        let t = relay.await.unwrap();
        assert!(t.error.is_none(), "{:?}", t.error);
        assert_eq!((t.up, t.down), (3 << 20, 5 << 20));
    }

    #[tokio::test]
    async fn a_slow_reader_gets_every_byte_through_both_modes() {
        let (mut client, mut client_side) = pair().await;
        let (mut upstream_side, mut server) = pair().await;
        let relay = tokio::spawn(async move { tcp_both(&mut client_side, &mut upstream_side).await });
        // Small writes first (copied), then bulk (spliced), all while the
        // server does not read, so the relay must hold and wait.
        let mut sent = Vec::new();
        for i in 0..200u32 {
            sent.extend_from_slice(&i.to_be_bytes());
        }
        sent.extend((0..6 << 20).map(|i| (i % 253) as u8));
        let data = sent.clone();
        let writer = tokio::spawn(async move {
            for chunk in data[..800].chunks(4) {
                client.write_all(chunk).await.unwrap();
            }
            client.write_all(&data[800..]).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got == sent, "{} bytes received of {}", got.len(), sent.len());
        drop(server);
        drop(writer.await.unwrap());
        let t = relay.await.unwrap();
        assert_eq!(t.up, sent.len() as u64);
    }

    #[tokio::test]
    async fn small_requests_and_answers_alternate_without_stalling() {
        let (mut client, mut client_side) = pair().await;
        let (mut upstream_side, mut server) = pair().await;
        let relay = tokio::spawn(async move { tcp_both(&mut client_side, &mut upstream_side).await });
        let echo = tokio::spawn(async move {
            let mut buf = [0u8; 100];
            for _ in 0..1000 {
                server.read_exact(&mut buf).await.unwrap();
                server.write_all(&buf).await.unwrap();
            }
        });
        let mut buf = [0u8; 100];
        for i in 0..1000u32 {
            let msg = [(i % 256) as u8; 100];
            client.write_all(&msg).await.unwrap();
            tokio::time::timeout(std::time::Duration::from_secs(5), client.read_exact(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(buf, msg);
        }
        echo.await.unwrap();
        drop(client);
        let t = relay.await.unwrap();
        assert_eq!((t.up, t.down), (100_000, 100_000));
    }

    #[tokio::test]
    async fn a_reset_ends_the_relay_with_the_bytes_counted_so_far() {
        let (mut client, mut client_side) = pair().await;
        let (mut upstream_side, server) = pair().await;
        let relay = tokio::spawn(async move { tcp_both(&mut client_side, &mut upstream_side).await });
        client.write_all(b"hello").await.unwrap();
        let mut server = server;
        let mut buf = [0u8; 5];
        server.read_exact(&mut buf).await.unwrap();
        // SO_LINGER 0: close sends RST.
        let linger = libc::linger { l_onoff: 1, l_linger: 0 };
        nix::sys::socket::setsockopt(&server, nix::sys::socket::sockopt::Linger, &linger).unwrap();
        drop(server);
        let t = tokio::time::timeout(std::time::Duration::from_secs(5), relay).await.unwrap().unwrap();
        assert_eq!(t.up, 5);
        assert_eq!(t.error.map(|e| e.kind()), Some(io::ErrorKind::ConnectionReset));
    }

    #[tokio::test]
    async fn copy_counts_bytes_each_way() {
        let (mut client, mut client_side) = pair().await;
        let (mut upstream_side, mut server) = pair().await;
        let relay = tokio::spawn(async move { copy_both(&mut client_side, &mut upstream_side).await });
        client.write_all(&[7u8; 1000]).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        server.write_all(&[1u8; 300]).await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        let t = relay.await.unwrap();
        assert_eq!((got.len(), back.len()), (1000, 300));
        assert_eq!((t.up, t.down), (1000, 300));
        assert!(t.error.is_none());
    }
}
