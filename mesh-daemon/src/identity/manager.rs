//! The certificates this daemon holds: its node's (served by the tunnel)
//! and one per local workload (presented as tunnel clients), issued from
//! the mesh CA and renewed at 70% of their lifetime. Renewal swaps the
//! certificate in place: open connections keep going, new handshakes get
//! the new one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::RootCertStore;
use tracing::{info, warn};

use super::certs::{Ca, CertError, Issued};
use super::tls::{self, SwapCert};
use super::Identity;

struct Held {
    issued: Arc<Issued>,
    swap: Arc<SwapCert>,
}

pub struct Certs {
    pub trust_domain: String,
    pub roots: Arc<RootCertStore>,
    ca: Ca,
    lifetime: Duration,
    node_id: Identity,
    node_swap: Arc<SwapCert>,
    node_issued: Mutex<Arc<Issued>>,
    workloads: Mutex<HashMap<Identity, Held>>,
    serial: AtomicU64,
}

fn held(issued: Arc<Issued>) -> Result<Held, CertError> {
    let key =
        tls::certified(&issued).map_err(|e| CertError::Issue { id: "certificate".into(), message: e.to_string() })?;
    Ok(Held { swap: SwapCert::new(key), issued })
}

impl Certs {
    pub fn new(
        trust_domain: &str,
        ca: Ca,
        roots: Arc<RootCertStore>,
        lifetime: Duration,
        node_id: Identity,
    ) -> Result<Arc<Self>, CertError> {
        let issued = ca.issue(&node_id, lifetime, 1)?;
        let node_swap = held(issued.clone())?.swap;
        info!(identity = %node_id, lifetime_s = lifetime.as_secs(), "node certificate issued");
        Ok(Arc::new(Self {
            trust_domain: trust_domain.to_owned(),
            roots,
            ca,
            lifetime,
            node_id,
            node_swap,
            node_issued: Mutex::new(issued),
            workloads: Mutex::new(HashMap::new()),
            serial: AtomicU64::new(1),
        }))
    }

    pub fn node_id(&self) -> &Identity {
        &self.node_id
    }

    /// The node certificate, as the tunnel server presents it.
    pub fn node_cert(&self) -> Arc<SwapCert> {
        self.node_swap.clone()
    }

    /// A workload's client certificate and its serial, if one was issued.
    /// Never signs anything: safe on an async worker thread.
    pub fn cached(&self, id: &Identity) -> Option<(Arc<SwapCert>, u64)> {
        let m = self.workloads.lock().unwrap_or_else(|p| p.into_inner());
        m.get(id).map(|h| (h.swap.clone(), h.issued.serial))
    }

    /// A workload's client certificate and its serial (a new serial means
    /// it was renewed); issued on first use. Signing takes milliseconds of
    /// CPU: async callers try [`Certs::cached`] first and call this from
    /// `spawn_blocking`. The lock is not held while signing.
    pub fn workload(&self, id: &Identity) -> Result<(Arc<SwapCert>, u64), CertError> {
        if let Some(c) = self.cached(id) {
            return Ok(c);
        }
        let serial = self.serial.fetch_add(1, Ordering::Relaxed) + 1;
        let h = held(self.ca.issue(id, self.lifetime, serial)?)?;
        let mut m = self.workloads.lock().unwrap_or_else(|p| p.into_inner());
        // Another caller may have issued one meanwhile: the first one stays.
        let h = m.entry(id.clone()).or_insert_with(|| {
            info!(identity = %id, serial, "workload certificate issued");
            h
        });
        Ok((h.swap.clone(), h.issued.serial))
    }

    /// Renews every certificate past 70% of its lifetime.
    pub fn renew_due(&self) {
        let now = SystemTime::now();
        {
            let mut node = self.node_issued.lock().unwrap_or_else(|p| p.into_inner());
            if node.due(now) {
                match self.renew(&self.node_id) {
                    Ok((key, issued)) => {
                        self.node_swap.set(key);
                        info!(identity = %self.node_id, serial = issued.serial, "node certificate renewed");
                        *node = issued;
                    }
                    Err(e) => warn!(error = %e, "renewing the node certificate failed; will retry"),
                }
            }
        }
        let mut m = self.workloads.lock().unwrap_or_else(|p| p.into_inner());
        for (id, h) in m.iter_mut() {
            if !h.issued.due(now) {
                continue;
            }
            match self.renew(id) {
                Ok((key, issued)) => {
                    h.swap.set(key);
                    info!(identity = %id, serial = issued.serial, "workload certificate renewed");
                    h.issued = issued;
                }
                Err(e) => warn!(identity = %id, error = %e, "renewing a workload certificate failed; will retry"),
            }
        }
    }

    /// A new certificate for `id` and its rustls key.
    fn renew(&self, id: &Identity) -> Result<(Arc<rustls::sign::CertifiedKey>, Arc<Issued>), CertError> {
        let serial = self.serial.fetch_add(1, Ordering::Relaxed) + 1;
        let issued = self.ca.issue(id, self.lifetime, serial)?;
        let key =
            tls::certified(&issued).map_err(|e| CertError::Issue { id: id.to_string(), message: e.to_string() })?;
        Ok((key, issued))
    }

    /// Checks for due renewals every 1/20 of the lifetime (0.2 s to 60 s).
    pub async fn renew_loop(self: Arc<Self>) {
        let every = (self.lifetime / 20).clamp(Duration::from_millis(200), Duration::from_secs(60));
        loop {
            tokio::time::sleep(every).await;
            let c = self.clone();
            let _ = tokio::task::spawn_blocking(move || c.renew_due()).await;
        }
    }
}
