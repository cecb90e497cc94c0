//! Whether a request goes again, and after what pause: one decision over
//! the request's retry policy, its deadline, its body, the service's retry
//! budget, the time and a random draw, all passed in. The I/O around it
//! (sending, waiting) is in [`super::handle`].

use std::time::Duration;

use tokio::time::Instant;

use super::policy::RetryBudget;
use crate::balance::backoff::Backoff;
use crate::env::Env;
use crate::model::http::RetryPolicy;
use crate::proxy::tries::RETRY_BACKOFF;

/// Why a request does not go again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRetry {
    /// The route retries nothing, or not this method.
    NoPolicy,
    /// The policy's attempts are used up.
    AttemptsUsed,
    /// The body went out and was too large to keep.
    BodyNotKept,
    /// The pause would end past the request's deadline.
    PastDeadline,
    /// The service's retry budget is spent.
    BudgetSpent,
}

/// The retry state of one request.
#[derive(Debug)]
pub struct Retrying<'a> {
    pub policy: Option<&'a RetryPolicy>,
    /// When the request's time (`timeouts`) runs out.
    pub deadline: Option<Instant>,
    pub budget: Option<&'a RetryBudget>,
    /// Retries so far.
    pub retried: u32,
}

impl Retrying<'_> {
    /// Whether one more try may repeat the request (its body is still
    /// whole when `replayable`), and the pause before it. Takes a retry
    /// from the budget when it says yes.
    pub fn again(&self, replayable: bool, env: &dyn Env) -> Result<Duration, NoRetry> {
        let r = self.policy.ok_or(NoRetry::NoPolicy)?;
        if self.retried >= r.attempts {
            return Err(NoRetry::AttemptsUsed);
        }
        if !replayable {
            return Err(NoRetry::BodyNotKept);
        }
        let backoff = r.backoff.map_or(RETRY_BACKOFF, |b| Backoff { base: b, max: b.saturating_mul(8), jitter: 0.0 });
        let pause = backoff.delay(self.retried, env.unit());
        if self.deadline.is_some_and(|d| env.now() + pause >= d) {
            return Err(NoRetry::PastDeadline);
        }
        if !self.budget.is_some_and(|b| b.withdraw(env.secs() as u64)) {
            return Err(NoRetry::BudgetSpent);
        }
        Ok(pause)
    }
}

/// When one try must have its answer: the request's deadline, or the
/// per-try timeout from the try's start `t0`, whichever is first.
pub fn try_deadline(deadline: Option<Instant>, per_try: Option<Duration>, t0: Instant) -> Option<Instant> {
    match (deadline, per_try.map(|t| t0 + t)) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::Scripted;
    use crate::model::http::{Budget, RetryOn};

    fn policy(attempts: u32) -> RetryPolicy {
        RetryPolicy {
            on: RetryOn { statuses: vec![(503, 503)], grpc: 0 },
            attempts,
            budget: Budget { ratio: 0.2, min_per_second: 10, window: Duration::from_secs(10) },
            max_body: 64 << 10,
            methods: None,
            backoff: None,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_waits_the_backoff_doubling_with_jitter_until_the_attempts_are_used() {
        let p = policy(3);
        let budget = RetryBudget::new(p.budget);
        // Draw 0: the whole backoff; draw 0.5 with jitter 0.5: three quarters.
        let env = Scripted::new(&[0.0, 0.5]);
        let r = |retried| Retrying { policy: Some(&p), deadline: None, budget: Some(&budget), retried };
        assert_eq!(r(0).again(true, &env), Ok(ms(10)));
        assert_eq!(r(1).again(true, &env), Ok(ms(15)));
        assert_eq!(r(2).again(true, &env), Ok(ms(40)));
        assert_eq!(r(3).again(true, &env), Err(NoRetry::AttemptsUsed));
        let none = Retrying { policy: None, deadline: None, budget: Some(&budget), retried: 0 };
        assert_eq!(none.again(true, &env), Err(NoRetry::NoPolicy));
        assert_eq!(r(0).again(false, &env), Err(NoRetry::BodyNotKept), "a body that went out unkept");
    }

    #[tokio::test(start_paused = true)]
    async fn no_retry_whose_pause_would_end_past_the_deadline() {
        let p = policy(5);
        let budget = RetryBudget::new(p.budget);
        let env = Scripted::new(&[0.0]);
        let deadline = Some(env.now() + ms(100));
        let r = |retried| Retrying { policy: Some(&p), deadline, budget: Some(&budget), retried };
        assert_eq!(r(0).again(true, &env), Ok(ms(10)));
        tokio::time::advance(ms(89)).await;
        assert_eq!(r(0).again(true, &env), Ok(ms(10)), "ends at 99 ms");
        tokio::time::advance(ms(1)).await;
        assert_eq!(r(0).again(true, &env), Err(NoRetry::PastDeadline), "would end at the deadline");
        assert_eq!(r(3).again(true, &env), Err(NoRetry::PastDeadline), "80 ms from 90 ms");
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_allows_its_minimum_per_second_then_a_share_of_the_requests() {
        let p = policy(1);
        let budget = RetryBudget::new(p.budget);
        let env = Scripted::new(&[0.0]);
        let r = Retrying { policy: Some(&p), deadline: None, budget: Some(&budget), retried: 0 };
        // With no request yet, the minimum: 10 retries in the first second.
        let first: Vec<bool> = (0..11).map(|_| r.again(true, &env).is_ok()).collect();
        assert_eq!(first.iter().filter(|ok| **ok).count(), 10, "{first:?}");
        assert_eq!(r.again(true, &env), Err(NoRetry::BudgetSpent));
        // A second later, 100 requests earn 20% more retries.
        tokio::time::advance(Duration::from_secs(1)).await;
        for _ in 0..100 {
            budget.deposit(env.secs() as u64);
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        // 10 a second over 3 seconds, and 20 of 100 requests: 50, of which 10 were taken.
        let later = (0..40).filter(|_| r.again(true, &env).is_ok()).count();
        assert_eq!(later, 40);
        assert_eq!(r.again(true, &env), Err(NoRetry::BudgetSpent));
    }

    #[tokio::test(start_paused = true)]
    async fn a_try_ends_at_the_request_deadline_or_its_own_timeout_whichever_is_first() {
        let t0 = Instant::now();
        let (d, per) = (Some(t0 + ms(500)), Some(ms(200)));
        assert_eq!(try_deadline(d, per, t0), Some(t0 + ms(200)));
        assert_eq!(try_deadline(d, per, t0 + ms(400)), Some(t0 + ms(500)));
        assert_eq!(try_deadline(d, None, t0), d);
        assert_eq!(try_deadline(None, per, t0), Some(t0 + ms(200)));
        assert_eq!(try_deadline(None, None, t0), None);
    }
}
