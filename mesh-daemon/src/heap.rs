//! Handing freed heap back to the system. glibc keeps what is freed for
//! later allocations; after a burst (a large apply's parse, thousands of
//! API connections that closed) the daemon's resident memory would stay
//! at the burst's peak. One helper thread drops what it is given and
//! trims the heap a second after such work pauses: bursts are trimmed
//! once, not after every step (a trim walks the heap).

use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// What the helper is given: something to drop, or nothing (trim only).
type Job = Option<Box<dyn Send>>;

fn helper() -> Option<&'static Mutex<Sender<Job>>> {
    static HELPER: OnceLock<Option<Mutex<Sender<Job>>>> = OnceLock::new();
    HELPER
        .get_or_init(|| {
            let (tx, rx) = channel::<Job>();
            let spawned = std::thread::Builder::new().name("heap-release".into()).spawn(move || {
                while let Ok(job) = rx.recv() {
                    drop(job);
                    loop {
                        match rx.recv_timeout(Duration::from_secs(1)) {
                            Ok(job) => drop(job),
                            Err(RecvTimeoutError::Timeout) => break,
                            Err(RecvTimeoutError::Disconnected) => return,
                        }
                    }
                    release_freed_heap();
                }
            });
            spawned.ok().map(|_| Mutex::new(tx))
        })
        .as_ref()
}

/// Drops `old` (a replaced state) off the caller's path, and trims once
/// such drops pause.
pub fn release_after<T: Send + 'static>(old: T) {
    match helper() {
        Some(tx) => {
            let _ = tx.lock().unwrap_or_else(|p| p.into_inner()).send(Some(Box::new(old)));
        }
        // Without the helper (it could not start), it is dropped here.
        None => drop(old),
    }
}

/// Trims the heap a second from now (or after the work in progress).
pub fn trim_soon() {
    if let Some(tx) = helper() {
        let _ = tx.lock().unwrap_or_else(|p| p.into_inner()).send(None);
    }
}

/// glibc keeps freed heap mapped after a burst: hand it back.
pub fn release_freed_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free pages of the allocator's own
    // heap to the kernel; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
