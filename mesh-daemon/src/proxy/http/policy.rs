//! The running side of a service's per-request policy: its retry budget
//! and its rate limiter, kept across state writes while the service's
//! policy stays the same (a write of unrelated endpoints must not refill a
//! bucket or forget the retries of the last seconds).
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::identity::Identity;
use crate::model::http::{Budget, HttpPolicy, RateLimit};
use crate::model::PortKey;

/// One service port's policy and its state.
#[derive(Debug)]
pub struct Policy {
    pub cfg: HttpPolicy,
    /// When retries are configured.
    pub budget: Option<RetryBudget>,
    pub limiter: Option<RateLimiter>,
}

impl Policy {
    pub fn new(cfg: HttpPolicy) -> Self {
        let budget = cfg
            .retries
            .is_some()
            .then(|| RetryBudget::new(cfg.retries.as_ref().map_or_else(Budget::default, |r| r.budget)));
        let limiter = cfg.rate_limit.map(RateLimiter::new);
        Self { cfg, budget, limiter }
    }
}

/// The policies of every service port, reused while unchanged.
#[derive(Debug, Default)]
pub struct Policies {
    kept: Mutex<HashMap<PortKey, Arc<Policy>>>,
}

impl Policies {
    /// The policy of service port `key` with `cfg`: the one it had, if
    /// `cfg` is the same.
    pub fn get(&self, key: &PortKey, cfg: &HttpPolicy) -> Arc<Policy> {
        let mut m = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        match m.get(key) {
            Some(p) if &p.cfg == cfg => p.clone(),
            _ => {
                let p = Arc::new(Policy::new(cfg.clone()));
                m.insert(key.clone(), p.clone());
                p
            }
        }
    }

    /// Forgets service port `key`.
    pub fn forget(&self, key: &PortKey) {
        self.kept.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }

    /// Forgets the service ports not in `keep`.
    pub fn retain(&self, keep: impl Fn(&PortKey) -> bool) {
        self.kept.lock().unwrap_or_else(|p| p.into_inner()).retain(|k, _| keep(k));
    }
}

/// Retries allowed: `ratio` per request plus `min_per_second` for every
/// second of the window that has passed, counted over the last `window`
/// (as linkerd2-proxy's budget, but the per-second reserve accrues with
/// time rather than being granted whole at the start). Seconds are
/// whole seconds of a clock passed in.
#[derive(Debug)]
pub struct RetryBudget {
    cfg: Budget,
    ring: Mutex<Ring>,
}

#[derive(Debug)]
struct Ring {
    /// Per second of the window: (second, requests, retries).
    slots: Vec<(u64, u64, u64)>,
    /// The first second this budget saw.
    first: Option<u64>,
}

impl RetryBudget {
    pub fn new(cfg: Budget) -> Self {
        let n = cfg.window.as_secs().max(1) as usize;
        Self { cfg, ring: Mutex::new(Ring { slots: vec![(u64::MAX, 0, 0); n], first: None }) }
    }

    fn with<T>(&self, now: u64, f: impl FnOnce(&mut (u64, u64, u64), &Ring) -> T) -> T {
        let mut r = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        r.first.get_or_insert(now);
        let n = r.slots.len();
        let i = (now % n as u64) as usize;
        if r.slots[i].0 != now {
            r.slots[i] = (now, 0, 0);
        }
        let mut slot = r.slots[i];
        let out = f(&mut slot, &r);
        r.slots[i] = slot;
        out
    }

    /// Counts a request.
    pub fn deposit(&self, now: u64) {
        self.with(now, |slot, _| slot.1 += 1);
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn withdraw(&self, now: u64) -> bool {
        let (ratio, min) = (self.cfg.ratio, self.cfg.min_per_second);
        self.with(now, |slot, r| {
            let n = r.slots.len() as u64;
            let oldest = now.saturating_sub(n - 1);
            let live = |s: &&(u64, u64, u64)| s.0 != u64::MAX && s.0 >= oldest && s.0 != now;
            let (mut requests, mut retries) = r.slots.iter().filter(live).fold((0, 0), |a, s| (a.0 + s.1, a.1 + s.2));
            requests += slot.1;
            retries += slot.2;
            let seconds = (now - r.first.unwrap_or(now) + 1).min(n);
            let allowed = ratio * requests as f64 + (min as u64 * seconds) as f64;
            if (retries + 1) as f64 <= allowed {
                slot.2 += 1;
                true
            } else {
                false
            }
        })
    }
}

/// A token bucket: `per_second` tokens a second, holding at most `burst`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: f64,
}

impl Bucket {
    fn full(cfg: &RateLimit, now: f64) -> Self {
        Self { tokens: f64::from(cfg.burst), at: now }
    }

    /// Takes a token at `now` (seconds); else the wait until one is due.
    fn take(&mut self, cfg: &RateLimit, now: f64) -> Result<(), Duration> {
        self.tokens = (self.tokens + (now - self.at).max(0.0) * cfg.per_second).min(f64::from(cfg.burst));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / cfg.per_second))
        }
    }

    fn is_full(&self, cfg: &RateLimit, now: f64) -> bool {
        self.tokens + (now - self.at).max(0.0) * cfg.per_second >= f64::from(cfg.burst)
    }
}

/// Identities tracked at once by a per-identity limiter; beyond them, full
/// buckets (which a new one would equal) are dropped first.
const MAX_IDENTITIES: usize = 10_000;

/// The node's limiter of one service port, shared by every worker.
#[derive(Debug)]
pub struct RateLimiter {
    cfg: RateLimit,
    shared: Mutex<Bucket>,
    by_identity: Mutex<HashMap<Identity, Bucket>>,
    /// The last second a refusal was logged: at most one line a second.
    logged: std::sync::atomic::AtomicU64,
}

impl RateLimiter {
    pub fn new(cfg: RateLimit) -> Self {
        Self {
            cfg,
            shared: Mutex::new(Bucket::full(&cfg, 0.0)),
            by_identity: Mutex::default(),
            logged: std::sync::atomic::AtomicU64::new(u64::MAX),
        }
    }

    /// Admits one request (or connection) of `who` at `now` (seconds);
    /// else how long until the next would be admitted.
    pub fn admit(&self, who: Option<&Identity>, now: f64) -> Result<(), Duration> {
        let cfg = &self.cfg;
        match who.filter(|_| cfg.per_identity) {
            None => self.shared.lock().unwrap_or_else(|p| p.into_inner()).take(cfg, now),
            Some(id) => {
                let mut m = self.by_identity.lock().unwrap_or_else(|p| p.into_inner());
                if m.len() >= MAX_IDENTITIES && !m.contains_key(id) {
                    m.retain(|_, b| !b.is_full(cfg, now));
                    if m.len() >= MAX_IDENTITIES {
                        // Every tracked client is mid-burst: the newcomer
                        // shares the service's bucket rather than evict one.
                        drop(m);
                        return self.shared.lock().unwrap_or_else(|p| p.into_inner()).take(cfg, now);
                    }
                }
                m.entry(id.clone()).or_insert_with(|| Bucket::full(cfg, now)).take(cfg, now)
            }
        }
    }

    /// Whether a refusal at second `now` should be logged (once a second).
    pub fn should_log(&self, now: u64) -> bool {
        self.logged.swap(now, std::sync::atomic::Ordering::Relaxed) != now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget() -> RetryBudget {
        RetryBudget::new(Budget { ratio: 0.2, min_per_second: 10, window: Duration::from_secs(10) })
    }

    #[test]
    fn the_budget_allows_a_fifth_of_requests_plus_ten_a_second() {
        let b = budget();
        // Second 100: 50 requests, so 0.2 * 50 + 10 = 20 retries.
        for _ in 0..50 {
            b.deposit(100);
        }
        let granted = (0..100).filter(|_| b.withdraw(100)).count();
        assert_eq!(granted, 20);
        // A second later: 10 more from the reserve, 2 from 10 new requests.
        for _ in 0..10 {
            b.deposit(101);
        }
        assert_eq!((0..100).filter(|_| b.withdraw(101)).count(), 12);
    }

    #[test]
    fn old_seconds_leave_the_window() {
        let b = budget();
        for _ in 0..100 {
            b.deposit(0);
        }
        assert_eq!((0..100).filter(|_| b.withdraw(0)).count(), 30);
        // Eleven seconds on, second 0 is out of the window: its requests
        // and retries no longer count; the reserve is the window's 100.
        assert_eq!((0..200).filter(|_| b.withdraw(11)).count(), 100);
    }

    #[test]
    fn a_bucket_admits_its_burst_then_the_rate() {
        let l = RateLimiter::new(RateLimit { per_second: 100.0, burst: 20, per_identity: false });
        let admitted = (0..50).filter(|_| l.admit(None, 0.0).is_ok()).count();
        assert_eq!(admitted, 20);
        let wait = l.admit(None, 0.0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.01).abs() < 1e-9, "{wait:?}");
        // A tenth of a second later: 10 more; and never more than the burst.
        assert_eq!((0..100).filter(|_| l.admit(None, 0.1).is_ok()).count(), 10);
        assert_eq!((0..100).filter(|_| l.admit(None, 10.0).is_ok()).count(), 20);
    }

    #[test]
    fn per_identity_buckets_keep_one_client_from_spending_anothers() {
        let l = RateLimiter::new(RateLimit { per_second: 1.0, burst: 2, per_identity: true });
        let a = Identity::parse("spiffe://cluster.local/ns/default/sa/a").unwrap();
        let b = Identity::parse("spiffe://cluster.local/ns/default/sa/b").unwrap();
        assert_eq!((0..10).filter(|_| l.admit(Some(&a), 0.0).is_ok()).count(), 2);
        assert_eq!((0..10).filter(|_| l.admit(Some(&b), 0.0).is_ok()).count(), 2, "b has its own bucket");
        assert_eq!((0..10).filter(|_| l.admit(None, 0.0).is_ok()).count(), 2, "no identity: the shared one");
    }
}
