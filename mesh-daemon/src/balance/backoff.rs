//! Exponential backoff with jitter: attempt n waits `min(base * 2^n, max)`
//! shortened by up to `jitter` of itself at random, so callers that failed
//! together do not retry together.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    /// 0 to 1: how much of the delay may be cut at random.
    pub jitter: f64,
}

impl Backoff {
    /// The delay before retry `attempt` (0 for the first), with `unit`
    /// uniform in [0, 1).
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let full = self.base.saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX)).min(self.max);
        full.mul_f64(1.0 - self.jitter.clamp(0.0, 1.0) * unit.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_max_and_jitters_down() {
        let b = Backoff { base: Duration::from_secs(1), max: Duration::from_secs(60), jitter: 0.5 };
        let s = Duration::from_secs;
        assert_eq!(b.delay(0, 0.0), s(1));
        assert_eq!(b.delay(3, 0.0), s(8));
        assert_eq!(b.delay(6, 0.0), s(60), "capped");
        assert_eq!(b.delay(40, 0.0), s(60), "no overflow");
        assert_eq!(b.delay(1, 0.999_999).as_millis(), 1000, "half of 2 s at most");
        assert_eq!(b.delay(1, 0.5), Duration::from_millis(1500));
    }
}
