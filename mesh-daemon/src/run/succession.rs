//! Handing the node to the next daemon, and stopping: the handover
//! server that offers this daemon's sockets, the signals, the drain.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing::{info, warn};

use super::{RunArgs, RunError};
use crate::control::Control;
use crate::datapath::{Datapath, DatapathConfig};
use crate::drain::Drain;
use crate::handover::{self, Taken};

/// The old daemon's side of a handover (see [`handover`]).
pub struct Predecessor {
    pub control: Arc<Control>,
    pub datapath: DatapathConfig,
    pub drain: Drain,
    pub runtime: tokio::runtime::Handle,
    pub handed_over: tokio::sync::mpsc::UnboundedSender<handover::Peer>,
}

impl handover::Owner for Predecessor {
    fn suspend(&self) -> Result<u64, handover::HandoverError> {
        self.control.suspend().map_err(|e| handover::HandoverError::Owner(e.to_string()))
    }

    fn resume(&self) {
        if self.drain.is_draining() {
            info!("draining already: the datapath stays pinned for the next daemon");
            return;
        }
        let _rt = self.runtime.enter();
        let r = Datapath::load(&self.datapath)
            .map_err(|e| e.to_string())
            .and_then(|(dp, _orig)| self.control.resume(dp).map_err(|e| e.to_string()));
        match r {
            Ok(()) => info!("took the datapath back; serving on"),
            Err(e) => tracing::error!(error = %e, "cannot take the datapath back after a failed handover"),
        }
    }

    fn handed_over(&self, to: &handover::Peer) {
        let _ = self.handed_over.send(to.clone());
    }
}

/// Tells the daemon before this one (if it handed over) that this one
/// serves: it stops accepting and drains.
pub fn serving(taken: Option<Taken>, path: &Path) -> Result<(), RunError> {
    if let Some(t) = taken {
        let from = t.from.pid;
        t.ready().map_err(|source| RunError::Handover { path: path.to_owned(), source })?;
        info!(from_pid = from, "serving on the listeners handed over; the daemon before this one drains");
    }
    Ok(())
}

/// Offers `copies` of the listeners to the next daemon at `path`; None
/// (logged) when the socket cannot be made.
pub fn offer(path: &Path, copies: Vec<(&'static str, OwnedFd)>, owner: Predecessor) -> Option<Arc<handover::Server>> {
    match handover::Server::bind(path) {
        Ok(server) => {
            for (name, fd) in copies {
                server.hold(name, fd);
            }
            server.spawn(Arc::new(owner));
            Some(server)
        }
        Err(e) => {
            warn!(socket = %path.display(), error = %e, "no handover socket (--handover-socket): the next daemon on this node starts with a gap");
            None
        }
    }
}

/// SIGTERM and SIGINT.
pub struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    pub fn install() -> Result<Self, RunError> {
        let term = signal(SignalKind::terminate()).map_err(super::error::io("installing the SIGTERM handler"))?;
        let int = signal(SignalKind::interrupt()).map_err(super::error::io("installing the SIGINT handler"))?;
        Ok(Self { term, int })
    }

    /// Until a signal or a handover: the daemon it handed over to, if any.
    pub async fn stop(
        &mut self,
        handed: &mut tokio::sync::mpsc::UnboundedReceiver<handover::Peer>,
        drain: &Drain,
        args: &RunArgs,
    ) -> Option<handover::Peer> {
        tokio::select! {
            _ = self.term.recv() => {
                info!(signal = "SIGTERM", open = drain.open(), drain_timeout = ?args.drain_timeout, "draining: new connections are refused, open ones may finish");
                None
            }
            _ = self.int.recv() => {
                info!(signal = "SIGINT", open = drain.open(), drain_timeout = ?args.drain_timeout, "draining: new connections are refused, open ones may finish");
                None
            }
            Some(to) = handed.recv() => {
                info!(to_pid = to.pid, open = drain.open(), drain_timeout = ?args.drain_timeout, "handed over: draining; the new daemon accepts the new connections");
                Some(to)
            }
        }
    }

    /// Drains for at most `timeout`, or until the signal that cuts it
    /// (see [`second_signal`]); logs what was left open.
    pub async fn drain(&mut self, drain: &Drain, timeout: std::time::Duration, handed_over: bool) {
        let left = tokio::select! {
            left = drain.wait_idle(timeout) => left,
            // After a handover the pod's SIGTERM is expected: it does not cut
            // the drain, a second signal does.
            left = second_signal(&mut self.term, &mut self.int, drain, handed_over) => left,
        };
        if left > 0 {
            warn!(open = left, "drain ended with connections still open; they are cut");
        } else {
            info!("drained");
        }
    }
}

/// Resolves on the signal that ends a drain early: the next one, or the
/// one after the next when `expected_one` (a pod's SIGTERM after a
/// handover). Returns the connections still open.
async fn second_signal(term: &mut Signal, int: &mut Signal, drain: &Drain, mut expected_one: bool) -> usize {
    loop {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        if !expected_one {
            return drain.open();
        }
        expected_one = false;
        info!(
            open = drain.open(),
            "signal while draining after a handover: the drain goes on (a second signal cuts it)"
        );
    }
}
