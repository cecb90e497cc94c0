//! The time and randomness the connection and request paths read, passed
//! in: the runtime's clock and a thread-local generator in the proxy, a
//! paused clock and a fixed sequence in tests, so every decision (which
//! endpoint, whether and when to retry, the rate limit, the budget)
//! replays exactly.

#[cfg(test)]
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::time::Instant;

pub trait Env: Send + Sync + 'static {
    /// Now, on the runtime's clock (tokio's: paused and advanced in tests).
    fn now(&self) -> Instant;
    /// Seconds on the clock the rate limits and retry budgets count in.
    fn secs(&self) -> f64;
    /// A draw uniform in [0, 1).
    fn unit(&self) -> f64;
}

/// The proxy's: tokio's clock and fastrand's thread-local generator.
#[derive(Debug, Clone, Copy, Default)]
pub struct Live;

impl Env for Live {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn secs(&self) -> f64 {
        process_secs()
    }
    // The one place the daemon draws from fastrand's generator directly.
    #[allow(clippy::disallowed_methods)]
    fn unit(&self) -> f64 {
        fastrand::f64()
    }
}

/// Seconds since the process first read this clock (tokio's), for the
/// rate windows of limits, budgets and metrics.
pub fn process_secs() -> f64 {
    process_start().elapsed().as_secs_f64()
}

/// [`process_secs`] at `now` (read already), in whole seconds: a request
/// that read the clock once for its duration counts its rates with it.
pub fn secs_at(now: Instant) -> u64 {
    now.saturating_duration_since(process_start()).as_secs()
}

fn process_start() -> Instant {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// The one the daemon passes: a `'static` reference, so holding it costs
/// no reference count per connection or request.
pub fn live() -> &'static dyn Env {
    &Live
}

/// Tokio's clock (pause it in the test) with seconds counted from when
/// this was made, and draws from a fixed list, over and over.
#[cfg(test)]
#[derive(Debug)]
pub struct Scripted {
    origin: Instant,
    draws: Vec<f64>,
    next: AtomicUsize,
}

#[cfg(test)]
impl Scripted {
    pub fn new(draws: &[f64]) -> Self {
        assert!(!draws.is_empty(), "at least one draw");
        Self { origin: Instant::now(), draws: draws.to_vec(), next: AtomicUsize::new(0) }
    }
}

#[cfg(test)]
impl Env for Scripted {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn secs(&self) -> f64 {
        self.origin.elapsed().as_secs_f64()
    }
    fn unit(&self) -> f64 {
        self.draws[self.next.fetch_add(1, Ordering::Relaxed) % self.draws.len()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn the_second_of_an_instant_read_already_is_the_process_second_then() {
        let before = Instant::now();
        let at = secs_at(before);
        assert_eq!(at, process_secs() as u64, "the clock process_secs counts on");
        tokio::time::advance(Duration::from_millis(3500)).await;
        let now = Instant::now();
        assert_eq!(secs_at(now), process_secs() as u64);
        assert!(secs_at(now) - at >= 3, "{} then {at}", secs_at(now));
        assert_eq!(secs_at(before), at, "an instant read earlier keeps its second");
    }
}
