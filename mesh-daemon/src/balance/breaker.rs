//! Passive health: a circuit breaker per endpoint. `threshold` consecutive
//! failures (connect errors, resets) eject the endpoint for a penalty from
//! [`Backoff`] (base 1 s, max 60 s, jitter 0.5). After the penalty one probe
//! connection is let through: success closes the breaker, failure ejects
//! again for twice the penalty.

use std::time::Duration;

use tokio::time::Instant;

use super::backoff::Backoff;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BreakerState {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
        attempt: u32,
    },
    /// One probe is in flight.
    Probing {
        attempt: u32,
    },
}

#[derive(Debug, Clone)]
pub struct Breaker {
    pub state: BreakerState,
    threshold: u32,
    backoff: Backoff,
}

impl Breaker {
    pub fn new(threshold: u32, backoff: Backoff) -> Self {
        Self { state: BreakerState::Closed { failures: 0 }, threshold: threshold.max(1), backoff }
    }

    /// Whether a new connection could go to this endpoint now (no change).
    pub fn available(&self, now: Instant) -> bool {
        match self.state {
            BreakerState::Closed { .. } => true,
            BreakerState::Open { until, .. } => now >= until,
            BreakerState::Probing { .. } => false,
        }
    }

    /// Claims the endpoint for one new connection: after the penalty, that
    /// connection is the probe.
    pub fn admit(&mut self, now: Instant) -> bool {
        match self.state {
            BreakerState::Closed { .. } => true,
            BreakerState::Open { until, attempt } if now >= until => {
                self.state = BreakerState::Probing { attempt };
                true
            }
            _ => false,
        }
    }

    /// Gives back a probe that was never tested (its connection failed for
    /// a reason that is not the endpoint's): the next connection probes.
    pub fn release(&mut self, now: Instant) {
        if let BreakerState::Probing { attempt } = self.state {
            self.state = BreakerState::Open { until: now, attempt };
        }
    }

    pub fn success(&mut self) {
        self.state = BreakerState::Closed { failures: 0 };
    }

    /// `unit`: uniform in [0, 1), for the jitter.
    pub fn failure(&mut self, now: Instant, unit: f64) {
        self.state = match self.state {
            BreakerState::Closed { failures } if failures + 1 >= self.threshold => {
                BreakerState::Open { until: now + self.backoff.delay(0, unit), attempt: 0 }
            }
            BreakerState::Closed { failures } => BreakerState::Closed { failures: failures + 1 },
            BreakerState::Probing { attempt } => {
                BreakerState::Open { until: now + self.backoff.delay(attempt + 1, unit), attempt: attempt + 1 }
            }
            open @ BreakerState::Open { .. } => open,
        };
    }

    /// Opens at once (failed answers in a row, counted by the caller):
    /// the same penalty and probe as consecutive connect failures.
    pub fn eject(&mut self, now: Instant, unit: f64) {
        self.state = match self.state {
            BreakerState::Closed { .. } => BreakerState::Open { until: now + self.backoff.delay(0, unit), attempt: 0 },
            BreakerState::Probing { attempt } => {
                BreakerState::Open { until: now + self.backoff.delay(attempt + 1, unit), attempt: attempt + 1 }
            }
            open @ BreakerState::Open { .. } => open,
        };
    }

    /// Whether a probe is out.
    pub fn probing(&self) -> bool {
        matches!(self.state, BreakerState::Probing { .. })
    }

    pub fn name(&self) -> &'static str {
        match self.state {
            BreakerState::Closed { .. } => "closed",
            BreakerState::Open { .. } => "open",
            BreakerState::Probing { .. } => "probing",
        }
    }

    /// Time left until the probe, when open.
    pub fn remaining(&self, now: Instant) -> Option<Duration> {
        match self.state {
            BreakerState::Open { until, .. } => Some(until.saturating_duration_since(now)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(3, Backoff { base: Duration::from_secs(1), max: Duration::from_secs(60), jitter: 0.5 })
    }

    #[tokio::test(start_paused = true)]
    async fn ejects_after_consecutive_failures_then_probes_with_doubling_penalty() {
        let mut b = breaker();
        let now = Instant::now;
        b.failure(now(), 0.0);
        b.failure(now(), 0.0);
        assert!(b.admit(now()), "two failures do not eject");
        b.success();
        b.failure(now(), 0.0);
        b.failure(now(), 0.0);
        assert!(b.available(now()), "a success reset the count");
        b.failure(now(), 0.0);
        assert!(!b.available(now()) && !b.admit(now()), "third consecutive failure ejects");

        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(!b.admit(now()), "still within the 1 s penalty");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(b.admit(now()), "the probe goes through after the penalty");
        assert!(!b.admit(now()), "only one probe at a time");

        b.failure(now(), 0.0);
        tokio::time::advance(Duration::from_millis(1999)).await;
        assert!(!b.available(now()), "a failed probe doubles the penalty to 2 s");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(b.admit(now()));
        b.success();
        assert_eq!(b.state, BreakerState::Closed { failures: 0 }, "a good probe restores the endpoint");
    }

    #[tokio::test(start_paused = true)]
    async fn a_released_probe_lets_the_next_connection_probe() {
        let mut b = breaker();
        for _ in 0..3 {
            b.failure(Instant::now(), 0.0);
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(b.admit(Instant::now()));
        b.release(Instant::now());
        assert!(b.admit(Instant::now()), "the untested probe was given back");
        b.success();
        b.release(Instant::now());
        assert_eq!(b.state, BreakerState::Closed { failures: 0 }, "releasing without a probe changes nothing");
    }

    #[tokio::test(start_paused = true)]
    async fn penalty_is_capped_and_jittered() {
        let mut b = breaker();
        for _ in 0..3 {
            b.failure(Instant::now(), 0.0);
        }
        for _ in 0..10 {
            tokio::time::advance(Duration::from_secs(61)).await;
            assert!(b.admit(Instant::now()));
            b.failure(Instant::now(), 0.0);
        }
        assert_eq!(b.remaining(Instant::now()), Some(Duration::from_secs(60)), "capped at 60 s");
        let mut j = breaker();
        for _ in 0..3 {
            j.failure(Instant::now(), 0.9);
        }
        assert_eq!(j.remaining(Instant::now()), Some(Duration::from_millis(550)), "jitter 0.5 shortens by up to half");
    }
}
