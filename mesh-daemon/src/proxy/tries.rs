//! The tries of one connection or request: which endpoint next (leaving
//! out those tried), and after a failure whether and when to try another.
//! One policy for both paths: only a failure of the endpoint (see
//! [`ConnectError::counts_against_endpoint`]) feeds its breaker and is
//! retried elsewhere, after a backoff, within the route's retry count and
//! budget; any other failure ends the tries at once.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use tokio::time::Instant;
use tracing::debug;

use super::error::ConnectError;
use super::{Route, RouteEndpoint};
use crate::balance::backoff::Backoff;
use crate::telemetry::ProxyCounters;

/// A first try and at most 10 retries (`retries` is validated to 0..10).
const MAX_TRIES: usize = 11;

/// Backoff between tries: 10 ms doubling to 500 ms, jitter 0.5.
pub const RETRY_BACKOFF: Backoff =
    Backoff { base: Duration::from_millis(10), max: Duration::from_millis(500), jitter: 0.5 };

/// Feeds a failed try on `ep` to its breaker if the failure is the
/// endpoint's; else gives back a probe the try claimed, untested. Returns
/// whether it was the endpoint's.
pub fn blame(ep: &RouteEndpoint, e: &ConnectError) -> bool {
    if !e.counts_against_endpoint() {
        ep.state.release_probe();
        return false;
    }
    if ep.state.failed(Instant::now()) {
        ep.series().ejections.inc();
    }
    true
}

pub struct Tries<'r> {
    route: &'r Route,
    start: Instant,
    /// Every endpoint tried so far, on the stack.
    tried: [SocketAddrV4; MAX_TRIES],
    n: usize,
    attempt: u32,
}

impl<'r> Tries<'r> {
    pub fn new(route: &'r Route) -> Self {
        Self {
            route,
            start: Instant::now(),
            tried: [SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0); MAX_TRIES],
            n: 0,
            attempt: 0,
        }
    }

    /// The endpoint for the next try (its index in the route), claiming
    /// the breaker's probe if one is due.
    pub fn pick(&mut self) -> Option<(usize, &'r RouteEndpoint)> {
        let i = self.route.pick_index(&self.tried[..self.n], Instant::now())?;
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
        if !blame(ep, e) {
            return false;
        }
        let pause = RETRY_BACKOFF.delay(self.attempt, fastrand::f64());
        if self.attempt >= self.route.retries || self.start.elapsed() + pause >= self.route.retry_budget {
            return false;
        }
        self.attempt += 1;
        counters.retries.inc();
        self.route.series().retries.inc();
        debug!(service = %self.route.name, error = %e, attempt = self.attempt, "connect failed; trying another endpoint");
        tokio::time::sleep(pause).await;
        true
    }
}
