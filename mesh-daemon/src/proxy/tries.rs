//! The tries of one connection or request: which endpoint next (leaving
//! out those tried), and after a failure whether and when to try another.
//! One policy for both paths: only a failure of the endpoint (see
//! [`ConnectError::counts_against_endpoint`]) feeds its breaker and is
//! retried elsewhere, after a backoff, within the route's retry count and
//! budget; any other failure ends the tries at once.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::time::Instant;
use tracing::debug;

use super::error::ConnectError;
use super::{Route, RouteEndpoint};
use crate::balance::backoff::Backoff;
use crate::env::Env;
use crate::proxy::ProxyCounters;

/// A first try and at most 10 retries (`retries` is validated to 0..10).
const MAX_TRIES: usize = 11;

/// Backoff between tries: 10 ms doubling to 500 ms, jitter 0.5.
pub const RETRY_BACKOFF: Backoff =
    Backoff { base: Duration::from_millis(10), max: Duration::from_millis(500), jitter: 0.5 };

/// Feeds a failed try on `ep` to its breaker if the failure is the
/// endpoint's; else gives back a probe the try claimed, untested. Returns
/// whether it was the endpoint's.
pub fn blame(ep: &RouteEndpoint, e: &ConnectError, env: &dyn Env) -> bool {
    if !e.counts_against_endpoint() {
        ep.state.release_probe();
        return false;
    }
    if ep.state.failed(env.now(), env.unit()) {
        ep.series().ejections.inc();
    }
    true
}

pub struct Tries<'r, 'e> {
    route: &'r Route,
    env: &'e dyn Env,
    start: Instant,
    /// Every endpoint tried so far, on the stack.
    tried: [SocketAddr; MAX_TRIES],
    n: usize,
    attempt: u32,
}

impl<'r, 'e> Tries<'r, 'e> {
    /// The tries of a request or connection that began at `start`.
    pub fn new(route: &'r Route, env: &'e dyn Env, start: Instant) -> Self {
        Self {
            route,
            env,
            start,
            tried: [SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0); MAX_TRIES],
            n: 0,
            attempt: 0,
        }
    }

    /// The endpoint for the next try (its index in the route), claiming
    /// the breaker's probe if one is due, as of `now`.
    pub fn pick(&mut self, now: Instant) -> Option<(usize, &'r RouteEndpoint)> {
        let i = self.route.pick_index_at(&self.tried[..self.n], now, self.env)?;
        let ep = &self.route.endpoints[i];
        if self.n < MAX_TRIES {
            self.tried[self.n] = ep.state.addr;
            self.n += 1;
        }
        Some((i, ep))
    }

    /// Lets every endpoint be picked again (a retried answer when all
    /// were tried: the same endpoint may answer differently).
    pub fn forget_tried(&mut self) {
        self.n = 0;
    }

    /// Records that the try on `ep` failed with `e`. Returns whether to try
    /// another endpoint; the backoff before it has passed when it returns.
    pub async fn failed(&mut self, ep: &RouteEndpoint, e: &ConnectError, counters: &ProxyCounters) -> bool {
        let Some(pause) = self.next(ep, e) else { return false };
        counters.retries.inc();
        self.route.series().retries.inc();
        debug!(service = %self.route.name, error = %e, attempt = self.attempt, "connect failed; trying another endpoint");
        tokio::time::sleep(pause).await;
        true
    }

    /// The decision of [`Tries::failed`]: blames the endpoint when the
    /// failure is its own, and then whether another try is left within
    /// the retries and the route's retry time, and the pause before it.
    pub fn next(&mut self, ep: &RouteEndpoint, e: &ConnectError) -> Option<Duration> {
        if !blame(ep, e, self.env) {
            return None;
        }
        let pause = RETRY_BACKOFF.delay(self.attempt, self.env.unit());
        if self.attempt >= self.route.retries || self.env.now() - self.start + pause >= self.route.retry_budget {
            return None;
        }
        self.attempt += 1;
        Some(pause)
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::Arc;

    use super::*;
    use crate::env::Scripted;
    use crate::model::NodeName;
    use crate::proxy::routes::testing::table_with;
    use crate::telemetry::Metrics;

    const EPS: &str = "   endpoints: [{ip: 10.0.0.1, node: a}, {ip: 10.0.0.2, node: a}, {ip: 10.0.0.3, node: a}]\n";

    fn refused(ep: &RouteEndpoint) -> ConnectError {
        ConnectError::Io { addr: ep.state.addr, source: io::Error::from(io::ErrorKind::ConnectionRefused) }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_failure_is_tried_on_another_endpoint_after_a_backoff_until_the_retries_are_used() {
        let (table, _) = table_with(&format!("   retries: 2\n{EPS}"), &Arc::new(Metrics::new()));
        let route = table.route(1).unwrap();
        let env = Scripted::new(&[0.0]);
        let mut tries = Tries::new(route, &env, env.now());
        let mut seen = Vec::new();
        let mut pauses = Vec::new();
        while let Some((_, ep)) = tries.pick(env.now()) {
            seen.push(ep.state.addr);
            match tries.next(ep, &refused(ep)) {
                Some(p) => pauses.push(p),
                None => break,
            }
        }
        assert_eq!(pauses, [ms(10), ms(20)], "10 ms doubling, draw 0 cuts nothing");
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 3, "each try on an endpoint not tried yet: {seen:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_that_is_not_the_endpoints_is_not_retried_and_blames_nothing() {
        let (table, _) = table_with(&format!("   retries: 2\n{EPS}"), &Arc::new(Metrics::new()));
        let route = table.route(1).unwrap();
        let env = Scripted::new(&[0.0]);
        let mut tries = Tries::new(route, &env, env.now());
        let (_, ep) = tries.pick(env.now()).unwrap();
        let e = ConnectError::NoIdentity { addr: ep.state.addr, node: NodeName::parse("b").unwrap() };
        assert_eq!(tries.next(ep, &e), None);
        for _ in 0..10 {
            assert!(!blame(ep, &e, &env));
        }
        assert!(ep.state.available(env.now()), "no ejection for a failure that is not the endpoint's");
        // Five refusals in a row are the endpoint's: it is ejected.
        for _ in 0..5 {
            assert!(blame(ep, &refused(ep), &env));
        }
        assert!(!ep.state.available(env.now()), "ejected after its own failures");
    }

    #[tokio::test(start_paused = true)]
    async fn no_try_whose_backoff_would_end_past_the_retry_time() {
        let (table, _) = table_with(&format!("   retries: 5\n   retryBudget: 100ms\n{EPS}"), &Arc::new(Metrics::new()));
        let route = table.route(1).unwrap();
        let env = Scripted::new(&[0.0]);
        let mut tries = Tries::new(route, &env, env.now());
        let (_, ep) = tries.pick(env.now()).unwrap();
        assert_eq!(tries.next(ep, &refused(ep)), Some(ms(10)));
        tokio::time::advance(ms(79)).await;
        let (_, ep) = tries.pick(env.now()).unwrap();
        assert_eq!(tries.next(ep, &refused(ep)), Some(ms(20)), "79 ms + 20 ms ends before 100 ms");
        let (_, ep) = tries.pick(env.now()).unwrap();
        assert_eq!(tries.next(ep, &refused(ep)), None, "79 ms + 40 ms would pass 100 ms");
    }
}
