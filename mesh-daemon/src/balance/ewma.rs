//! Peak-EWMA of connect latency, as linkerd2-proxy keeps it: a sample above
//! the estimate replaces it at once (react to trouble fast), a lower one
//! pulls it down with weight `1 - exp(-elapsed / decay)` (recover slowly).
//! Until the first sample the estimate is a configured default.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct PeakEwma {
    estimate_ns: f64,
    stamp: Instant,
    decay_ns: f64,
    measured: bool,
}

impl PeakEwma {
    pub fn new(default: Duration, decay: Duration, now: Instant) -> Self {
        Self {
            estimate_ns: default.as_nanos() as f64,
            stamp: now,
            decay_ns: decay.as_nanos().max(1) as f64,
            measured: false,
        }
    }

    pub fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        if !self.measured || rtt > self.estimate_ns {
            self.estimate_ns = rtt;
        } else {
            let elapsed = now.saturating_duration_since(self.stamp).as_nanos() as f64;
            let keep = (-elapsed / self.decay_ns).exp();
            self.estimate_ns = self.estimate_ns * keep + rtt * (1.0 - keep);
        }
        self.measured = true;
        self.stamp = now;
    }

    /// Whether any sample was seen (else `get` is the default).
    pub fn measured(&self) -> bool {
        self.measured
    }

    pub fn get(&self) -> Duration {
        Duration::from_nanos(self.estimate_ns as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peaks_at_once_and_decays_slowly() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut e = PeakEwma::new(ms(100), Duration::from_secs(10), t0);
        assert_eq!(e.get(), ms(100), "default until measured");
        e.observe(ms(5), t0);
        assert_eq!(e.get(), ms(5), "the first sample replaces the default");
        e.observe(ms(50), t0 + ms(10));
        assert_eq!(e.get(), ms(50), "a peak replaces the estimate");
        e.observe(ms(5), t0 + ms(1010));
        let after_1s = e.get();
        assert!(after_1s > ms(45) && after_1s < ms(50), "1 s of a 10 s decay moves ~10%: {after_1s:?}");
        e.observe(ms(5), t0 + Duration::from_secs(101));
        assert!(e.get() < ms(6), "long after, the estimate follows the samples: {:?}", e.get());
    }
}
