//! The certificates this daemon holds: its node's (served by the tunnel)
//! and one per local workload (presented as tunnel clients). They come
//! from the issuer (CSRs; the CA key stays there), renewed at 50% of their
//! lifetime so that an issuer outage of up to half a lifetime costs
//! nothing, or, for development on one machine, from a CA key this daemon
//! holds (renewed at 70%). Renewal swaps the certificate in place: open
//! connections keep going, new handshakes get the new one. A renewal that
//! fails is retried with backoff (1 s doubling up to the check interval,
//! jittered so that nodes do not return to an issuer all at once), and
//! logged loudly as expiry nears.
//!
//! Connections that race for a workload's first certificate share one
//! request (single flight, as ztunnel's SecretManager): a hundred
//! connections of a new pod cost the issuer one CSR.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::RootCertStore;
use tokio::sync::OnceCell;
use tracing::{info, warn};

use super::certs::{Ca, CertError, Issued};
use super::issuer::IssuerClient;
use super::tls::{self, SwapCert};
use super::Identity;
use crate::env::{Env, Live};

/// A workload certificate and its serial, once its request is answered.
type Issuing = (Arc<SwapCert>, u64);

struct Held {
    issued: Arc<Issued>,
    swap: Arc<SwapCert>,
}

/// Where certificates come from.
pub enum Signer {
    /// A CA key held by this daemon (development on one machine).
    Local(Arc<Ca>),
    /// CSRs to the issuer: no CA key on the node.
    Issuer(IssuerClient),
}

impl Signer {
    /// A certificate for `id`: signed off the async workers (a local key),
    /// or asked of the issuer.
    async fn issue(&self, id: &Identity, lifetime: Duration, serial: u64) -> Result<Arc<Issued>, CertError> {
        match self {
            Signer::Local(ca) => {
                let (ca, who) = (ca.clone(), id.clone());
                tokio::task::spawn_blocking(move || ca.issue(&who, lifetime, serial))
                    .await
                    .map_err(|e| CertError::Issue { id: id.to_string(), message: e.to_string() })?
            }
            Signer::Issuer(c) => c.issue(id, serial).await,
        }
    }

    /// The share of a certificate's lifetime after which it is renewed.
    fn renew_at(&self) -> f64 {
        match self {
            Signer::Local(_) => 0.7,
            Signer::Issuer(_) => 0.5,
        }
    }
}

pub struct Certs {
    pub trust_domain: String,
    pub roots: Arc<RootCertStore>,
    signer: Signer,
    lifetime: Duration,
    node_id: Identity,
    node_swap: Arc<SwapCert>,
    node_issued: Mutex<Arc<Issued>>,
    workloads: Mutex<HashMap<Identity, Held>>,
    /// First certificates being asked for: one request per identity, the
    /// other callers wait for it.
    pending: Mutex<HashMap<Identity, Arc<OnceCell<Issuing>>>>,
    /// The serial of the last certificate asked for: one per request
    /// (signed or sent to the issuer), renewals included.
    serial: AtomicU64,
}

/// A renewal failed: retried at the next check; loud once less than a
/// fifth of the lifetime is left.
fn failed(id: &Identity, current: &Issued, now: SystemTime, e: &CertError) {
    let left = current.not_after.duration_since(now).unwrap_or_default();
    let life = current.not_after.duration_since(current.not_before).unwrap_or_default();
    if left < life / 5 {
        tracing::error!(identity = %id, expires_in_s = left.as_secs(), error = %e, "certificate renewal keeps failing and the certificate expires soon: is the issuer up?");
    } else {
        warn!(identity = %id, expires_in_s = left.as_secs(), error = %e, "renewing a certificate failed; will retry");
    }
}

fn held(issued: Arc<Issued>) -> Result<Held, CertError> {
    let key =
        tls::certified(&issued).map_err(|e| CertError::Issue { id: "certificate".into(), message: e.to_string() })?;
    Ok(Held { swap: SwapCert::new(key), issued })
}

impl Certs {
    /// Certificates from a CA key this daemon holds.
    pub fn new(
        trust_domain: &str,
        ca: Ca,
        roots: Arc<RootCertStore>,
        lifetime: Duration,
        node_id: Identity,
    ) -> Result<Arc<Self>, CertError> {
        let issued = ca.issue(&node_id, lifetime, 1)?;
        Self::build(trust_domain, Signer::Local(Arc::new(ca)), roots, lifetime, node_id, issued)
    }

    /// Certificates from the issuer; the node certificate first, asked for
    /// up to five times over about 15 s before giving up.
    pub async fn from_issuer(
        trust_domain: &str,
        client: IssuerClient,
        roots: Arc<RootCertStore>,
        lifetime: Duration,
        node_id: Identity,
    ) -> Result<Arc<Self>, CertError> {
        let mut pause = Duration::from_secs(1);
        let issued = loop {
            match client.issue(&node_id, 1).await {
                Ok(i) => break i,
                Err(e) if pause <= Duration::from_secs(8) => {
                    warn!(error = %e, retry_in_s = pause.as_secs(), "no node certificate from the issuer yet");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                Err(e) => return Err(e),
            }
        };
        Self::build(trust_domain, Signer::Issuer(client), roots, lifetime, node_id, issued)
    }

    fn build(
        trust_domain: &str,
        signer: Signer,
        roots: Arc<RootCertStore>,
        lifetime: Duration,
        node_id: Identity,
        issued: Arc<Issued>,
    ) -> Result<Arc<Self>, CertError> {
        let node_swap = held(issued.clone())?.swap;
        info!(identity = %node_id, lifetime_s = lifetime.as_secs(), "node certificate issued");
        Ok(Arc::new(Self {
            trust_domain: trust_domain.to_owned(),
            roots,
            signer,
            lifetime,
            node_id,
            node_swap,
            node_issued: Mutex::new(issued),
            workloads: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
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

    /// When each certificate held now was issued and expires: the node's
    /// (`node`) and every workload's (`workload`).
    pub fn validity(&self) -> Vec<(&'static str, SystemTime, SystemTime)> {
        let node = self.node_issued.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut out = vec![("node", node.not_before, node.not_after)];
        let m = self.workloads.lock().unwrap_or_else(|p| p.into_inner());
        out.extend(m.values().map(|h| ("workload", h.issued.not_before, h.issued.not_after)));
        out
    }

    /// Certificates asked for so far (the node's first one included).
    pub fn requests(&self) -> u64 {
        self.serial.load(Ordering::Relaxed)
    }

    /// A workload's client certificate and its serial (a new serial means
    /// it was renewed); issued on first use. Callers racing for the same
    /// new identity share one request; if it fails, each waiting caller
    /// gets to try again in turn (a failure is not cached).
    pub async fn workload(&self, id: &Identity) -> Result<(Arc<SwapCert>, u64), CertError> {
        if let Some(c) = self.cached(id) {
            return Ok(c);
        }
        let cell = {
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            p.entry(id.clone()).or_default().clone()
        };
        let got = cell
            .get_or_try_init(|| async {
                // Issued while this caller waited for the lock of the cell.
                if let Some(c) = self.cached(id) {
                    return Ok(c);
                }
                let serial = self.next_serial();
                let h = held(self.signer.issue(id, self.lifetime, serial).await?)?;
                let mut m = self.workloads.lock().unwrap_or_else(|p| p.into_inner());
                let h = m.entry(id.clone()).or_insert_with(|| {
                    info!(identity = %id, serial, "workload certificate issued");
                    h
                });
                Ok((h.swap.clone(), h.issued.serial))
            })
            .await
            .cloned();
        if got.is_ok() {
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            if p.get(id).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                p.remove(id);
            }
        }
        got
    }

    fn next_serial(&self) -> u64 {
        self.serial.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Renews every certificate past its renewal point; false when one
    /// failed. No lock is held while the issuer is asked.
    pub async fn renew_due(&self) -> bool {
        let now = SystemTime::now();
        let mut all_ok = true;
        let at = self.signer.renew_at();
        let node_due = self.node_issued.lock().unwrap_or_else(|p| p.into_inner()).due_at(now, at);
        if node_due {
            let renewed = self.renew(&self.node_id).await;
            let mut node = self.node_issued.lock().unwrap_or_else(|p| p.into_inner());
            match renewed {
                Ok((key, issued)) => {
                    self.node_swap.set(key);
                    info!(identity = %self.node_id, serial = issued.serial, "node certificate renewed");
                    *node = issued;
                }
                Err(e) => {
                    all_ok = false;
                    failed(&self.node_id, &node, now, &e);
                }
            }
        }
        // Renewed outside the lock: asking the issuer takes a round trip.
        let due: Vec<Identity> = {
            let m = self.workloads.lock().unwrap_or_else(|p| p.into_inner());
            m.iter().filter(|(_, h)| h.issued.due_at(now, at)).map(|(id, _)| id.clone()).collect()
        };
        for id in due {
            let renewed = self.renew(&id).await;
            let mut m = self.workloads.lock().unwrap_or_else(|p| p.into_inner());
            let Some(h) = m.get_mut(&id) else { continue };
            match renewed {
                Ok((key, issued)) => {
                    h.swap.set(key);
                    info!(identity = %id, serial = issued.serial, "workload certificate renewed");
                    h.issued = issued;
                }
                Err(e) => {
                    all_ok = false;
                    failed(&id, &h.issued, now, &e);
                }
            }
        }
        all_ok
    }

    /// A new certificate for `id` and its rustls key.
    async fn renew(&self, id: &Identity) -> Result<(Arc<rustls::sign::CertifiedKey>, Arc<Issued>), CertError> {
        let serial = self.next_serial();
        let issued = self.signer.issue(id, self.lifetime, serial).await?;
        let key =
            tls::certified(&issued).map_err(|e| CertError::Issue { id: id.to_string(), message: e.to_string() })?;
        Ok((key, issued))
    }

    /// Checks for due renewals every 1/20 of the lifetime (0.2 s to 60
    /// s); after a failed renewal, sooner: see [`next_pause`].
    pub async fn renew_loop(self: Arc<Self>) {
        let every = (self.lifetime / 20).clamp(Duration::from_millis(200), Duration::from_secs(60));
        let mut failures = 0u32;
        loop {
            tokio::time::sleep(next_pause(every, failures, Live.unit())).await;
            let ok = self.renew_due().await;
            failures = if ok { 0 } else { failures.saturating_add(1) };
        }
    }
}

/// The pause before the next renewal check: `every`, or after `failures`
/// failed ones in a row 1 s doubling up to `every`; within ±20% by
/// `jitter` (0..1) so that nodes spread out.
fn next_pause(every: Duration, failures: u32, jitter: f64) -> Duration {
    let base = match failures {
        0 => every,
        n => Duration::from_secs(1).saturating_mul(1 << (n - 1).min(16)).min(every),
    };
    base.mul_f64(0.8 + 0.4 * jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certs(name: &str) -> Arc<Certs> {
        let dir = std::env::temp_dir().join(format!("mesh-certs-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (c, k) = Ca::generate("cluster.local", Duration::from_secs(3600)).unwrap();
        std::fs::write(dir.join("ca.pem"), c).unwrap();
        std::fs::write(dir.join("ca.key"), k).unwrap();
        let ca = Ca::from_files(&dir.join("ca.pem"), &dir.join("ca.key")).unwrap();
        let roots = tls::trust_bundle(&dir.join("ca.pem")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let node = Identity::parse("spiffe://cluster.local/ns/mesh-system/node/a").unwrap();
        Certs::new("cluster.local", ca, roots, Duration::from_secs(3600), node).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hundred_callers_racing_for_a_new_identity_cause_one_request() {
        let certs = certs("race");
        assert_eq!(certs.requests(), 1, "the node's own certificate");
        let id = Identity::parse("spiffe://cluster.local/ns/default/sa/web").unwrap();
        let start = Arc::new(tokio::sync::Barrier::new(100));
        let callers: Vec<_> = (0..100)
            .map(|_| {
                let (certs, id, start) = (certs.clone(), id.clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    certs.workload(&id).await.map(|(_, serial)| serial)
                })
            })
            .collect();
        let mut serials = std::collections::BTreeSet::new();
        for c in callers {
            serials.insert(c.await.unwrap().unwrap());
        }
        assert_eq!(certs.requests(), 2, "one request for the workload");
        assert_eq!(serials.len(), 1, "every caller got the same certificate: {serials:?}");
        // Another identity is a request of its own; a known one is none.
        let other = Identity::parse("spiffe://cluster.local/ns/default/sa/db").unwrap();
        certs.workload(&other).await.unwrap();
        certs.workload(&id).await.unwrap();
        assert_eq!(certs.requests(), 3);
    }

    #[test]
    fn a_failed_renewal_is_retried_after_1s_doubling_up_to_the_check_interval_with_jitter() {
        let every = Duration::from_secs(60);
        let mid = |failures| next_pause(every, failures, 0.5);
        assert_eq!(mid(0), every, "no failure: the check interval");
        let backoff: Vec<u64> = (1..=8).map(|n| mid(n).as_secs()).collect();
        assert_eq!(backoff, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(next_pause(every, 0, 0.0), Duration::from_secs(48), "-20%");
        assert_eq!(next_pause(every, 0, 1.0), Duration::from_secs(72), "+20%");
        assert_eq!(
            next_pause(Duration::from_millis(500), 3, 0.5),
            Duration::from_millis(500),
            "never past the interval"
        );
        assert_eq!(mid(u32::MAX), every, "no overflow");
    }
}
