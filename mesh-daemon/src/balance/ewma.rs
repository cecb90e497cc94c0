//! Peak-EWMA of latency, as linkerd2-proxy keeps it: a sample above the
//! estimate replaces it at once (react to trouble fast), a lower one pulls
//! it down with weight `1 - exp(-elapsed / decay)` (recover slowly), but at
//! least 1/20: at thousands of requests a second, one slow sample fades
//! within a few dozen others instead of holding for the time constant.
//! Until the first sample the estimate is a configured default.

use std::time::Duration;

use tokio::time::Instant;

/// A peak fades within about this many lower samples, however close
/// together they come.
const RECOVERY_SAMPLES: f64 = 20.0;

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
            // Recover with the time constant, but at high rates at least a
            // [`RECOVERY_SAMPLES`]th of the way per sample: one slow sample
            // among thousands a second must not outweigh them for seconds.
            let keep = (-elapsed / self.decay_ns).exp().min(1.0 - 1.0 / RECOVERY_SAMPLES);
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

    #[test]
    fn a_lone_peak_fades_within_dozens_of_close_samples() {
        let t0 = Instant::now();
        let us = Duration::from_micros;
        let mut e = PeakEwma::new(us(300), Duration::from_secs(10), t0);
        e.observe(us(300), t0);
        e.observe(us(5000), t0 + us(500));
        assert_eq!(e.get(), us(5000), "the peak at once");
        for i in 2..62 {
            e.observe(us(300), t0 + us(500 * i));
        }
        assert!(e.get() < us(600), "60 samples in 30 ms: {:?}", e.get());
    }
}
