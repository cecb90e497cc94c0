//! Where log lines go: a buffer that one thread writes to stderr in
//! batches, so that a slow reader of stderr (a full pipe to the container
//! runtime) never stalls the proxy, and a busy proxy makes few writes.
//!
//! A line is appended under a lock; the first line of a batch wakes the
//! writer thread, which waits [`GATHER`] for more and then writes them all
//! in one go. While [`MAX_PENDING`] bytes wait, new lines are dropped and
//! counted, never waited for. Nothing spins: the thread sleeps on a
//! condition variable between batches.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// How long the writer gathers lines after the first of a batch.
const GATHER: Duration = Duration::from_millis(20);
/// Bytes that may wait; beyond them new lines are dropped.
const MAX_PENDING: usize = 4 << 20;

#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    closed: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    ready: Condvar,
    dropped: AtomicU64,
}

/// The handle `tracing_subscriber::fmt` writes through.
#[derive(Clone)]
pub struct LogWriter(Arc<Shared>);

/// Reads how many lines were dropped.
#[derive(Clone)]
pub struct DroppedLines(Arc<Shared>);

impl DroppedLines {
    pub fn get(&self) -> u64 {
        self.0.dropped.load(Ordering::Relaxed)
    }
}

/// Writes what is left and stops the thread when dropped.
pub struct FlushOnDrop {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for FlushOnDrop {
    fn drop(&mut self) {
        self.shared.pending.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        self.shared.ready.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the writer thread for `out`.
pub fn start<W: Write + Send + 'static>(out: W) -> (LogWriter, DroppedLines, FlushOnDrop) {
    let shared =
        Arc::new(Shared { pending: Mutex::new(Pending::default()), ready: Condvar::new(), dropped: AtomicU64::new(0) });
    let s = shared.clone();
    let thread = std::thread::Builder::new().name("mesh-log".into()).spawn(move || run(&s, out)).ok();
    (LogWriter(shared.clone()), DroppedLines(shared.clone()), FlushOnDrop { shared, thread })
}

fn run<W: Write>(shared: &Shared, mut out: W) {
    let mut batch = Vec::new();
    loop {
        let closed = {
            let mut p = shared.pending.lock().unwrap_or_else(|p| p.into_inner());
            while p.buf.is_empty() && !p.closed {
                p = shared.ready.wait(p).unwrap_or_else(|p| p.into_inner());
            }
            p.closed
        };
        if !closed {
            // The writer's own thread: gathering lines into one write.
            #[allow(clippy::disallowed_methods)]
            std::thread::sleep(GATHER);
        }
        let closed = {
            let mut p = shared.pending.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::swap(&mut batch, &mut p.buf);
            p.closed
        };
        // Nowhere to report a failed write to stderr: the lines are lost.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        if closed {
            let rest = std::mem::take(&mut shared.pending.lock().unwrap_or_else(|p| p.into_inner()).buf);
            let _ = out.write_all(&rest).and_then(|()| out.flush());
            return;
        }
    }
}

impl LogWriter {
    /// Queues one line (or drops and counts it when too much waits).
    pub fn push(&self, line: &[u8]) {
        let first = {
            let mut p = self.0.pending.lock().unwrap_or_else(|p| p.into_inner());
            if p.buf.len() + line.len() > MAX_PENDING {
                self.0.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            p.buf.extend_from_slice(line);
            p.buf.len() == line.len()
        };
        if first {
            self.0.ready.notify_one();
        }
    }
}

impl Write for LogWriter {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        self.push(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Collects what reaches "stderr"; can be made to block like a full pipe.
    #[derive(Clone, Default)]
    struct Sink {
        got: Arc<Mutex<Vec<u8>>>,
        gate: Arc<Mutex<()>>,
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _open = self.gate.lock().unwrap();
            self.got.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_arrives_in_order_and_the_rest_is_written_at_drop() {
        let sink = Sink::default();
        let (mut w, dropped, flush) = start(sink.clone());
        for i in 0..1000 {
            w.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        drop(flush);
        let text = String::from_utf8(sink.got.lock().unwrap().clone()).unwrap();
        let want: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(text, want);
        assert_eq!(dropped.get(), 0);
    }

    #[test]
    fn a_stuck_stderr_drops_and_counts_lines_instead_of_blocking_the_caller() {
        let sink = Sink::default();
        let gate = sink.gate.clone();
        let stuck = gate.lock().unwrap();
        let (w, dropped, flush) = start(sink.clone());
        // 12 MiB against a stderr that takes nothing: the caller never waits.
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut w = w;
            let line = [b'x'; 1024];
            for _ in 0..12 * 1024 {
                w.write_all(&line).unwrap();
            }
            let _ = done.send(());
        });
        finished.recv_timeout(Duration::from_secs(30)).expect("the caller was blocked by a stuck stderr");
        assert!(dropped.get() > 0, "nothing was dropped");
        drop(stuck);
        drop(flush);
        let got = sink.got.lock().unwrap().len();
        assert!(got <= MAX_PENDING + 1024 && got > 0, "{got} bytes written");
    }
}
