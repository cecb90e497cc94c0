//! Graceful shutdown and the one accept loop every listener runs.
//!
//! On SIGTERM the daemon calls [`Drain::start`]: every accept loop returns
//! and drops its listener (new connections are refused), while the
//! connections already accepted hold a [`Guard`] and run on. The daemon
//! then waits in [`Drain::wait_idle`] until the last guard is gone or the
//! drain deadline passes, and exits. ztunnel's `drain.rs` is the model.
#![forbid(unsafe_code)]

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tracing::{info, warn};

#[derive(Debug)]
struct Inner {
    stop: watch::Sender<bool>,
    open: AtomicUsize,
    idle: Notify,
}

/// Cheap to clone: every listener and connection shares one.
#[derive(Debug, Clone)]
pub struct Drain(Arc<Inner>);

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

/// One connection (or tunnel stream) in flight; the drain waits for it.
#[derive(Debug)]
pub struct Guard(Arc<Inner>);

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Drain {
    pub fn new() -> Self {
        Self(Arc::new(Inner { stop: watch::channel(false).0, open: AtomicUsize::new(0), idle: Notify::new() }))
    }

    /// Counts one connection until the guard is dropped.
    pub fn guard(&self) -> Guard {
        self.0.open.fetch_add(1, Ordering::AcqRel);
        Guard(self.0.clone())
    }

    /// Connections in flight.
    pub fn open(&self) -> usize {
        self.0.open.load(Ordering::Acquire)
    }

    /// Stops every accept loop.
    pub fn start(&self) {
        self.0.stop.send_replace(true);
    }

    pub fn is_draining(&self) -> bool {
        *self.0.stop.borrow()
    }

    /// Resolves once [`Drain::start`] was called.
    pub async fn stopped(&self) {
        let mut rx = self.0.stop.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Waits until no connection is in flight, or `deadline` passes.
    /// Returns how many were still open (0: all finished).
    pub async fn wait_idle(&self, deadline: Duration) -> usize {
        let wait = async {
            loop {
                let idle = self.0.idle.notified();
                if self.open() == 0 {
                    return;
                }
                idle.await;
            }
        };
        let _ = tokio::time::timeout(deadline, wait).await;
        self.open()
    }
}

impl Drain {
    /// Runs a served connection to its end; when the drain starts, asks it
    /// to end gracefully (`shutdown`: hyper's `graceful_shutdown`, so
    /// HTTP/2 peers get a GOAWAY and HTTP/1 ones a close after the
    /// response in progress) and lets it finish.
    pub async fn serve<C: Future>(&self, conn: C, shutdown: impl FnOnce(Pin<&mut C>)) -> C::Output {
        match self.serve_until_idle(conn, shutdown, std::future::pending()).await {
            Ended::Done(r) => r,
            Ended::Idle(_) => unreachable!("a pending future never resolves"),
        }
    }
}

/// How long a connection ended for being idle has, after its GOAWAY, to
/// finish what it still has open (a stream that moved nothing either)
/// before it is closed.
const IDLE_GRACE: Duration = Duration::from_secs(5);

/// How [`Drain::serve_until_idle`] ended a connection.
#[derive(Debug)]
pub enum Ended<O> {
    /// It ended by itself, or by the drain.
    Done(O),
    /// It moved nothing for the idle timeout and was asked to end; None
    /// when it did not within [`IDLE_GRACE`] and was closed.
    Idle(Option<O>),
}

impl Drain {
    /// As [`Drain::serve`], and asks the connection to end gracefully (the
    /// same `shutdown`) once `idle` resolves too.
    pub async fn serve_until_idle<C: Future>(
        &self,
        conn: C,
        shutdown: impl FnOnce(Pin<&mut C>),
        idle: impl Future<Output = ()>,
    ) -> Ended<C::Output> {
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => Ended::Done(r),
            _ = self.stopped() => {
                shutdown(conn.as_mut());
                Ended::Done(conn.await)
            }
            _ = idle => {
                shutdown(conn.as_mut());
                Ended::Idle(tokio::time::timeout(IDLE_GRACE, conn).await.ok())
            }
        }
    }
}

/// A cap on the connections a listener serves at once (the control API,
/// the admin endpoint): past it, a new connection is closed at once, so
/// a client that opens thousands and sends nothing holds no more than
/// the cap (each an fd, a task and hyper's buffers).
#[derive(Debug)]
pub struct Gate {
    name: &'static str,
    max: usize,
    open: AtomicUsize,
    /// Most connections open since the gate was last empty.
    peak: AtomicUsize,
    /// Whether the refusal was logged since the gate was last below the cap.
    warned: std::sync::atomic::AtomicBool,
}

/// One connection through a [`Gate`].
#[derive(Debug)]
pub struct Pass(Arc<Gate>);

/// Connections above which the heap is trimmed once they have all closed.
const TRIM_AFTER: usize = 64;

impl Gate {
    pub fn new(name: &'static str, max: usize) -> Arc<Self> {
        Arc::new(Self {
            name,
            max,
            open: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            warned: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// A pass for one more connection; None at the cap.
    pub fn enter(self: &Arc<Self>) -> Option<Pass> {
        let n = self.open.fetch_add(1, Ordering::AcqRel) + 1;
        if n > self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            if !self.warned.swap(true, Ordering::AcqRel) {
                warn!(
                    listener = self.name,
                    limit = self.max,
                    "connections at their limit; new ones are closed at once"
                );
            }
            return None;
        }
        self.peak.fetch_max(n, Ordering::AcqRel);
        Some(Pass(self.clone()))
    }

    #[cfg(test)]
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        let g = &self.0;
        let left = g.open.fetch_sub(1, Ordering::AcqRel) - 1;
        if left < g.max {
            g.warned.store(false, Ordering::Release);
        }
        // A burst has closed: the memory its connections held goes back.
        if left == 0 && g.peak.swap(0, Ordering::AcqRel) > TRIM_AFTER {
            crate::heap::trim_soon();
        }
    }
}

/// A listener of any kind: TCP or Unix.
pub trait Listener: Send + 'static {
    type Io: Send + 'static;
    type Addr: Send + 'static;
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Io, Self::Addr)>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;
    async fn accept(&self) -> io::Result<(Self::Io, Self::Addr)> {
        tokio::net::TcpListener::accept(self).await.map(no_delay)
    }
}

/// Every TCP connection the daemon accepts sends what it is given at once,
/// as those it makes do (`proxy::dial`, the tunnel's client): with Nagle's
/// algorithm a small answer may wait until the peer acknowledged the one
/// before (BENCHMARKS.md, seventh round: lower latency at a fixed rate,
/// the same throughput).
fn no_delay<A>((io, addr): (tokio::net::TcpStream, A)) -> (tokio::net::TcpStream, A) {
    let _ = io.set_nodelay(true);
    (io, addr)
}

/// The listening sockets of one listener, one per address family (an
/// IPv6 one beside the IPv4 one), accepted from as one: one accept loop,
/// taking from each in turn so neither starves the other.
pub struct TcpListeners {
    pub sockets: Vec<tokio::net::TcpListener>,
    next: std::sync::atomic::AtomicUsize,
}

impl TcpListeners {
    pub fn new(sockets: Vec<tokio::net::TcpListener>) -> Self {
        Self { sockets, next: Default::default() }
    }
}

impl Listener for TcpListeners {
    type Io = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Io, Self::Addr)>> + Send {
        use std::sync::atomic::Ordering::Relaxed;
        let first = self.next.fetch_add(1, Relaxed);
        std::future::poll_fn(move |cx| {
            let n = self.sockets.len();
            for i in 0..n {
                if let std::task::Poll::Ready(r) = self.sockets[(first + i) % n].poll_accept(cx) {
                    return std::task::Poll::Ready(r.map(no_delay));
                }
            }
            std::task::Poll::Pending
        })
    }
}

impl Listener for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    type Addr = tokio::net::unix::SocketAddr;
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Io, Self::Addr)>> + Send {
        tokio::net::UnixListener::accept(self)
    }
}

/// Out of descriptors or memory: accepting again at once would fail again.
fn exhausted(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// Pause after a failed accept: 5 ms, doubling to 1 s while the failures
/// are about exhausted resources; other errors (a peer that reset before
/// the accept) retry after 5 ms.
fn pause(e: &io::Error, streak: u32) -> Duration {
    if exhausted(e) {
        Duration::from_millis(5u64 << streak.min(8)).min(Duration::from_secs(1))
    } else {
        Duration::from_millis(5)
    }
}

/// Serves one connection of a node-local HTTP/1 endpoint (the control
/// API, the admin port): each request's headers must arrive within
/// `header_timeout`, which also closes a keep-alive connection idle that
/// long. `name` labels the debug line of a connection that ends in error.
pub async fn serve_local_http1<IO, S, B>(io: IO, svc: S, header_timeout: Duration, name: &'static str)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
        hyper::Request<hyper::body::Incoming>,
        Response = hyper::Response<B>,
        Error = std::convert::Infallible,
    >,
    S::Future: Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc);
    if let Err(e) = conn.await {
        tracing::debug!(listener = name, error = %e, "connection ended in error");
    }
}

/// Accepts on `listener` until the drain starts, handing each connection
/// to `on_accept`; the listener is dropped on return, so new connections
/// are refused from then on.
pub async fn accept_loop<L: Listener>(
    listener: L,
    name: &'static str,
    drain: Drain,
    mut on_accept: impl FnMut(L::Io, L::Addr) + Send,
) {
    let mut streak = 0u32;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = drain.stopped() => {
                info!(listener = name, "stopped accepting");
                return;
            }
            a = listener.accept() => a,
        };
        match accepted {
            Ok((io, addr)) => {
                streak = 0;
                on_accept(io, addr);
            }
            Err(e) => {
                let wait = pause(&e, streak);
                // One line per streak step, not per failed call.
                if streak < 9 {
                    warn!(listener = name, error = %e, pause_ms = wait.as_millis() as u64, "accept failed");
                }
                streak = streak.saturating_add(1);
                tokio::time::sleep(wait).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// hyper's header-read timeout also closes a kept-alive HTTP/1.1
    /// connection that waits for its next request: the API, the admin port
    /// and the proxy's HTTP/1.1 request path count on it.
    #[tokio::test(start_paused = true)]
    async fn a_kept_alive_http1_connection_is_closed_after_the_header_timeout() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (io, mut client) = tokio::io::duplex(4096);
        let svc = hyper::service::service_fn(|_req| async {
            Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from("ok"))))
        });
        let served = tokio::spawn(serve_local_http1(io, svc, Duration::from_secs(10), "test"));
        client.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut answer = [0u8; 256];
        let n = client.read(&mut answer).await.unwrap();
        assert!(answer[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer[..n]));
        let answered = tokio::time::Instant::now();
        // Kept alive, and nothing more: closed at the timeout.
        assert_eq!(client.read(&mut answer).await.unwrap(), 0, "closed, not another answer");
        let waited = answered.elapsed();
        assert!(waited >= Duration::from_secs(10) && waited < Duration::from_secs(11), "closed after {waited:?}");
        served.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_asked_to_end_and_closed_if_it_does_not() {
        let d = Drain::new();
        let idle = || tokio::time::sleep(Duration::from_secs(1));
        // One that ends when asked (an HTTP/2 connection after its GOAWAY).
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let t0 = tokio::time::Instant::now();
        let ended = d
            .serve_until_idle(
                rx,
                move |_| {
                    let _ = tx.send(());
                },
                idle(),
            )
            .await;
        assert!(matches!(ended, Ended::Idle(Some(Ok(())))), "{ended:?}");
        assert_eq!(t0.elapsed(), Duration::from_secs(1));
        // One that does not: closed after the grace.
        let asked = std::cell::Cell::new(false);
        let t0 = tokio::time::Instant::now();
        let ended = d.serve_until_idle(std::future::pending::<()>(), |_| asked.set(true), idle()).await;
        assert!(matches!(ended, Ended::Idle(None)) && asked.get(), "{ended:?}");
        assert_eq!(t0.elapsed(), Duration::from_secs(1) + IDLE_GRACE);
        // One that ends first is done, and was never asked.
        let ended = d.serve_until_idle(async { 7 }, |_| panic!("asked to end"), idle()).await;
        assert!(matches!(ended, Ended::Done(7)), "{ended:?}");
    }

    #[tokio::test]
    async fn the_drain_waits_for_every_guard_up_to_the_deadline() {
        let d = Drain::new();
        assert_eq!(d.wait_idle(Duration::from_millis(10)).await, 0, "nothing open: at once");
        let g1 = d.guard();
        let g2 = d.guard();
        assert_eq!(d.wait_idle(Duration::from_millis(20)).await, 2, "the deadline ends the wait");
        drop(g1);
        let waiter = tokio::spawn({
            let d = d.clone();
            async move { d.wait_idle(Duration::from_secs(10)).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(g2);
        assert_eq!(waiter.await.unwrap(), 0, "the last guard ends the wait");
    }

    #[tokio::test]
    async fn accept_loops_return_when_the_drain_starts_and_new_connects_are_refused() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let d = Drain::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(accept_loop(l, "test", d.clone(), move |io, _| {
            let _ = tx.send(io);
        }));
        let _c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let accepted = rx.recv().await.expect("accepted before the drain");
        assert!(accepted.nodelay().unwrap(), "an accepted connection has Nagle's algorithm off");
        d.start();
        task.await.unwrap();
        let refused = tokio::net::TcpStream::connect(addr).await;
        assert_eq!(refused.unwrap_err().kind(), io::ErrorKind::ConnectionRefused);
    }

    /// One accept loop over an IPv4 and an IPv6 socket takes from both,
    /// each client seen by its own family.
    #[tokio::test]
    async fn one_loop_accepts_from_a_socket_of_each_family() {
        let v4 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let v6 = tokio::net::TcpListener::bind("[::1]:0").await.unwrap();
        let (a4, a6) = (v4.local_addr().unwrap(), v6.local_addr().unwrap());
        let d = Drain::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(accept_loop(TcpListeners::new(vec![v4, v6]), "test", d.clone(), move |io, peer| {
            let _ = tx.send((io, peer));
        }));
        let mut held = Vec::new();
        for round in 0..3 {
            for a in [a6, a4] {
                held.push(tokio::net::TcpStream::connect(a).await.unwrap());
                let (io, peer) = rx.recv().await.unwrap();
                assert_eq!(peer.is_ipv6(), a.is_ipv6(), "round {round}: {peer} for {a}");
                assert!(io.nodelay().unwrap(), "round {round}: Nagle's algorithm on for {peer}");
            }
        }
        d.start();
        task.await.unwrap();
    }

    #[test]
    fn a_gate_lets_its_cap_through_and_frees_a_pass_for_the_next() {
        let g = Gate::new("test", 2);
        let (a, b) = (g.enter(), g.enter());
        assert!(a.is_some() && b.is_some());
        assert!(g.enter().is_none(), "the third is refused");
        assert_eq!(g.open(), 2, "a refusal holds nothing");
        drop(a);
        assert!(g.enter().is_some(), "a closed connection makes room");
        drop(b);
        assert_eq!(g.open(), 0);
    }

    #[test]
    fn exhausted_resources_back_off_other_errors_do_not() {
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        assert_eq!(pause(&emfile, 0), Duration::from_millis(5));
        assert_eq!(pause(&emfile, 3), Duration::from_millis(40));
        assert_eq!(pause(&emfile, 30), Duration::from_secs(1), "capped");
        let aborted = io::Error::from_raw_os_error(libc::ECONNABORTED);
        assert_eq!(pause(&aborted, 30), Duration::from_millis(5));
    }
}
