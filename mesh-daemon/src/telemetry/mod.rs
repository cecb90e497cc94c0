//! Counters of the proxy and the admin HTTP endpoint that shows them.
#![forbid(unsafe_code)]

pub mod admin;
pub mod logwriter;
pub mod metrics;

pub use metrics::Metrics;

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// What the outbound proxy has done since start.
#[derive(Debug, Default)]
pub struct ProxyCounters {
    /// Connections accepted on the outbound listener.
    pub accepted: Counter,
    /// Closed at once: the kernel recorded no original destination.
    pub no_orig_dst: Counter,
    /// Closed at once: the recorded service no longer exists.
    pub no_route: Counter,
    /// Closed at once: the service has no endpoint.
    pub no_endpoint: Counter,
    pub connect_failed: Counter,
    /// Closed at once, not retried, no endpoint blamed: refused by the
    /// remote node's policy, or the client has no identity to cross with.
    pub refused: Counter,
    /// Connect tries on another endpoint after a failed one.
    pub retries: Counter,
    /// Connected to an endpoint and forwarded.
    pub forwarded: Counter,
    /// Open forwarded connections.
    pub active: Counter,
    pub io_errors: Counter,
    pub bytes_to_endpoint: Counter,
    pub bytes_to_client: Counter,
}

#[derive(Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ProxySnapshot {
    pub accepted: u64,
    pub no_orig_dst: u64,
    pub no_route: u64,
    pub no_endpoint: u64,
    pub connect_failed: u64,
    pub refused: u64,
    pub retries: u64,
    pub forwarded: u64,
    pub active: u64,
    pub io_errors: u64,
    pub bytes_to_endpoint: u64,
    pub bytes_to_client: u64,
}

impl ProxyCounters {
    pub fn snapshot(&self) -> ProxySnapshot {
        ProxySnapshot {
            accepted: self.accepted.get(),
            no_orig_dst: self.no_orig_dst.get(),
            no_route: self.no_route.get(),
            no_endpoint: self.no_endpoint.get(),
            connect_failed: self.connect_failed.get(),
            refused: self.refused.get(),
            retries: self.retries.get(),
            forwarded: self.forwarded.get(),
            active: self.active.get(),
            io_errors: self.io_errors.get(),
            bytes_to_endpoint: self.bytes_to_endpoint.get(),
            bytes_to_client: self.bytes_to_client.get(),
        }
    }
}
