//! Readiness, and the datapath's hand-over: let go for the next daemon,
//! taken back when it fails, shut down.

use super::*;

impl Control {
    /// Ready: the datapath is attached and holds the accepted state.
    /// Otherwise, why not. Takes no lock: a write in progress does not
    /// hold it up.
    pub fn readiness(&self) -> Result<(), NotReady> {
        if let Some(p) = self.problem.load_full() {
            return Err(NotReady((*p).clone()));
        }
        if self.attached.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(NotReady("the datapath is not attached".into()))
        }
    }

    /// For a handover: stops writing the maps (writes are refused with
    /// [`WriteError::HandingOver`], health changes wait) and drops the
    /// datapath's handles, leaving it attached and pinned for the next
    /// daemon. Returns the state's generation.
    pub fn suspend(&self) -> Result<u64, HandoverError> {
        let mut inner = self.inner.lock().map_err(|_| HandoverError::Poisoned)?;
        let dp = inner.datapath.take().ok_or(HandoverError::Released)?;
        inner.synced = None;
        dp.shutdown(false);
        Ok(inner.current.stored.generation)
    }

    /// After a handover that failed: takes the datapath back and writes
    /// the whole state to it (the other daemon may have written it too).
    pub fn resume(&self, mut dp: Datapath) -> Result<(), HandoverError> {
        let mut inner = self.inner.lock().map_err(|_| HandoverError::Poisoned)?;
        let want = self.contents(&inner.current);
        let r = self.timed_sync(&mut dp, &want);
        inner.datapath = Some(dp);
        match r {
            Ok(_) => {
                inner.synced = Some(want);
                Ok(())
            }
            Err(e) => {
                let e = HandoverError::Resync(e);
                self.problem.store(Some(Arc::new(e.to_string())));
                Err(e)
            }
        }
    }

    /// Stops taking writes and hands the datapath to `shutdown`.
    pub fn shutdown(&self, cleanup: bool) {
        self.attached.store(false, Ordering::Release);
        if let Ok(mut inner) = self.inner.lock() {
            if let Some(dp) = inner.datapath.take() {
                dp.shutdown(cleanup);
            }
        }
    }
}
