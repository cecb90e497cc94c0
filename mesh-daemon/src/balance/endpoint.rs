//! What the mesh knows about one endpoint address, shared by the proxy,
//! the health checker and the kernel sync: latency, load, breaker, and
//! active health.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::time::Instant;

use super::backoff::Backoff;
use super::breaker::Breaker;
use super::ewma::PeakEwma;

/// Knobs of the balancer (daemon-wide).
#[derive(Debug, Clone, Copy)]
pub struct BalanceConfig {
    /// RTT assumed for an endpoint not measured yet.
    pub default_rtt: Duration,
    /// Peak-EWMA time constant.
    pub decay: Duration,
    /// Consecutive failures that open the breaker.
    pub breaker_failures: u32,
    pub breaker_backoff: Backoff,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        Self {
            default_rtt: Duration::from_millis(30),
            decay: Duration::from_secs(10),
            breaker_failures: 3,
            breaker_backoff: Backoff { base: Duration::from_secs(1), max: Duration::from_secs(60), jitter: 0.5 },
        }
    }
}

#[derive(Debug)]
struct Active {
    healthy: bool,
    ok_streak: u32,
    fail_streak: u32,
    reason: String,
    changed: SystemTime,
}

#[derive(Debug)]
struct Health {
    ewma: PeakEwma,
    breaker: Breaker,
    active: Active,
    /// Failed answers in a row (outlier ejection by answers).
    failed_answers: u32,
}

/// What an answer did to an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answered {
    Ok,
    /// Failed, not (yet) ejected.
    Failed,
    /// Failed, and the endpoint is ejected (or, a failed probe, again).
    Ejected,
}

#[derive(Debug)]
pub struct EndpointState {
    pub addr: SocketAddr,
    in_flight: AtomicU64,
    health: Mutex<Health>,
}

/// One endpoint's state, as `meshctl get endpoints` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointView {
    /// `healthy` or `unhealthy` (active checks; healthy until a check says otherwise).
    pub active: &'static str,
    /// `closed`, `open` or `probing`.
    pub breaker: &'static str,
    pub reason: String,
    /// Seconds since the active state last changed.
    pub since_change_s: u64,
    pub ewma_rtt_ms: f64,
    pub in_flight: u64,
}

/// Counts a connection in flight until dropped.
pub struct InFlight<'a>(&'a EndpointState);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl EndpointState {
    pub fn new(addr: SocketAddr, cfg: &BalanceConfig) -> Self {
        Self {
            addr,
            in_flight: AtomicU64::new(0),
            health: Mutex::new(Health {
                ewma: PeakEwma::new(cfg.default_rtt, cfg.decay, Instant::now()),
                breaker: Breaker::new(cfg.breaker_failures, cfg.breaker_backoff),
                active: Active {
                    healthy: true,
                    ok_streak: 0,
                    fail_streak: 0,
                    reason: "not checked yet".into(),
                    changed: SystemTime::now(),
                },
                failed_answers: 0,
            }),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Health) -> T) -> T {
        let mut g = self.health.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// Healthy by the active checks.
    pub fn actively_healthy(&self) -> bool {
        self.with(|h| h.active.healthy)
    }

    /// Healthy by the active checks and not ejected by the breaker.
    pub fn available(&self, now: Instant) -> bool {
        self.with(|h| h.active.healthy && h.breaker.available(now))
    }

    /// This endpoint's inputs to P2C, with `weight` from the route.
    pub fn load(&self, weight: u16) -> super::select::Load {
        let (rtt, measured) = self.with(|h| (h.ewma.get().as_nanos() as f64, h.ewma.measured()));
        super::select::Load { weight, rtt, measured, in_flight: self.in_flight.load(Ordering::Relaxed) }
    }

    /// Claims the endpoint for a new connection (the breaker's probe, if
    /// it is due).
    pub fn admit(&self, now: Instant) -> bool {
        self.with(|h| h.breaker.admit(now))
    }

    /// Gives back the breaker's probe if this connection held it but
    /// failed for a reason that is not the endpoint's.
    pub fn release_probe(&self) {
        let now = Instant::now();
        self.with(|h| h.breaker.release(now));
    }

    pub fn start(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    pub fn connected(&self, rtt: Duration, now: Instant) {
        self.with(|h| {
            h.ewma.observe(rtt, now);
            h.breaker.success();
        });
    }

    /// An endpoint's answer to a request ended: a good one closes the
    /// breaker (it was reached and answered); a failed one counts, and the
    /// `threshold`-th in a row (0: never) ejects it through the breaker if
    /// `may_eject` (the service's cap on ejected endpoints). A failed probe
    /// ejects it again, for longer.
    /// `unit`: a draw uniform in [0, 1) for the penalty's jitter.
    pub fn answered(&self, ok: bool, threshold: u32, may_eject: bool, now: Instant, unit: f64) -> Answered {
        self.with(|h| {
            if ok {
                h.failed_answers = 0;
                h.breaker.success();
                return Answered::Ok;
            }
            h.failed_answers = h.failed_answers.saturating_add(1);
            if h.breaker.probing() || (threshold > 0 && h.failed_answers >= threshold && may_eject) {
                h.failed_answers = 0;
                h.breaker.eject(now, unit);
                Answered::Ejected
            } else {
                Answered::Failed
            }
        })
    }

    /// A connect time seen by an active check: feeds the latency estimate
    /// only (the breaker follows real traffic and the check's verdict).
    pub fn observe_rtt(&self, rtt: Duration, now: Instant) {
        self.with(|h| h.ewma.observe(rtt, now));
    }

    /// Records a failure; returns whether it ejected the endpoint. `unit`:
    /// a draw uniform in [0, 1) for the penalty's jitter.
    pub fn failed(&self, now: Instant, unit: f64) -> bool {
        self.with(|h| {
            let was = h.breaker.available(now);
            h.breaker.failure(now, unit);
            was && !h.breaker.available(now)
        })
    }

    /// Records an active check; returns whether the healthy state changed.
    /// `rise` successes in a row make it healthy, `fall` failures unhealthy.
    /// Turning healthy also closes the breaker: the endpoint is back.
    pub fn record_check(&self, ok: bool, reason: &str, rise: u32, fall: u32) -> bool {
        self.with(|h| {
            let a = &mut h.active;
            if ok {
                a.ok_streak += 1;
                a.fail_streak = 0;
            } else {
                a.fail_streak += 1;
                a.ok_streak = 0;
            }
            let flip = if a.healthy { !ok && a.fail_streak >= fall } else { ok && a.ok_streak >= rise };
            if flip {
                a.healthy = !a.healthy;
                a.changed = SystemTime::now();
                if a.healthy {
                    h.breaker.success();
                }
            }
            if flip || a.reason != reason {
                a.reason = reason.to_owned();
            }
            flip
        })
    }

    pub fn view(&self, now: Instant) -> EndpointView {
        let in_flight = self.in_flight.load(Ordering::Relaxed);
        self.with(|h| {
            let reason = match h.breaker.remaining(now) {
                Some(left) => format!("{}; breaker open for {:.1} s more", h.active.reason, left.as_secs_f64()),
                None => h.active.reason.clone(),
            };
            EndpointView {
                active: if h.active.healthy { "healthy" } else { "unhealthy" },
                breaker: h.breaker.name(),
                reason,
                since_change_s: h.active.changed.elapsed().map(|d| d.as_secs()).unwrap_or(0),
                ewma_rtt_ms: (h.ewma.get().as_secs_f64() * 1000.0 * 100.0).round() / 100.0,
                in_flight,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rise_and_fall_thresholds() {
        let e = EndpointState::new("10.0.0.1:80".parse().unwrap(), &BalanceConfig::default());
        assert!(e.actively_healthy(), "healthy until checked otherwise");
        assert!(!e.record_check(false, "refused", 2, 3));
        assert!(!e.record_check(false, "refused", 2, 3));
        assert!(e.record_check(false, "refused", 2, 3), "third failure flips");
        assert!(!e.actively_healthy());
        assert!(!e.record_check(true, "ok", 2, 3));
        assert!(e.record_check(true, "ok", 2, 3), "second success flips back");
        assert!(e.actively_healthy());
        assert_eq!(e.view(Instant::now()).reason, "ok");
    }

    #[tokio::test(start_paused = true)]
    async fn coming_back_healthy_closes_the_breaker() {
        let e = EndpointState::new("10.0.0.1:80".parse().unwrap(), &BalanceConfig::default());
        for _ in 0..3 {
            e.failed(Instant::now(), 0.5);
        }
        assert!(!e.available(Instant::now()));
        e.record_check(false, "refused", 1, 1);
        e.record_check(true, "ok", 1, 1);
        assert!(e.available(Instant::now()), "an endpoint the checks see back is not held out by the breaker");
    }
}
