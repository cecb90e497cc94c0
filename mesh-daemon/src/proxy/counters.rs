//! The outbound proxy's counters, registered by the proxy.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Unit;
use serde::Serialize;

use crate::telemetry::metrics::{DirectionLabels, EventLabels};
use crate::telemetry::Metrics;

/// What the outbound proxy has done since start: handles of
/// `mesh_outbound_events_total`, `mesh_outbound_active_connections` and
/// `mesh_outbound_bytes_total`, so a connection only touches atomics and a
/// scrape copies nothing.
#[derive(Debug, Clone)]
pub struct ProxyCounters {
    /// Connections accepted on the outbound listener.
    pub accepted: Counter,
    /// Closed at once: the kernel recorded no original destination.
    pub no_orig_dst: Counter,
    /// Closed at once: the recorded service no longer exists.
    pub no_route: Counter,
    /// No endpoint could be reached (its own failures, or none left).
    pub connect_failed: Counter,
    /// Closed at once, not retried, no endpoint blamed: refused by the
    /// remote node's policy, or the client has no identity to cross with.
    pub refused: Counter,
    /// Connect tries on another endpoint after a failed one.
    pub retries: Counter,
    /// Connected to an endpoint and forwarded.
    pub forwarded: Counter,
    /// Open forwarded connections.
    pub active: Gauge,
    pub io_errors: Counter,
    /// Requests whose header block passed the limit
    /// (`--max-request-headers`), answered 431 (but not those HTTP/2
    /// refuses in its framing, past 4x the limit, which it does not tell).
    pub headers_too_large: Counter,
    /// The clients whose 431 was logged.
    pub headers_too_large_logged: OncePerClient,
    /// HTTP/2 client connections closed for moving nothing for the idle
    /// timeout.
    pub idle_closed: Counter,
    pub bytes_to_endpoint: Counter,
    pub bytes_to_client: Counter,
    /// Copies of requests a route's RequestMirror sent, and answered.
    pub mirrored: Counter,
    /// Copies that found no endpoint, failed or timed out (the client
    /// never sees it).
    pub mirror_failed: Counter,
    /// Requests not copied: their body was larger than is kept (64 KiB),
    /// or not whole when the answer came.
    pub mirror_skipped: Counter,
}

impl ProxyCounters {
    /// Registers `mesh_outbound_events_total`,
    /// `mesh_outbound_active_connections` and `mesh_outbound_bytes_total`
    /// into `m` (once per daemon).
    pub fn new(m: &Metrics) -> Self {
        let events: Family<EventLabels, Counter> = Family::default();
        let moved: Family<DirectionLabels, Counter> = Family::default();
        let active = Gauge::default();
        m.register("outbound_events", "What the outbound listener did with accepted connections", events.clone());
        m.register("outbound_active_connections", "Forwarded connections open now", active.clone());
        m.register_with_unit("outbound", "Bytes the outbound proxy moved, by direction", Unit::Bytes, moved.clone());
        let event = |event| events.get_or_create(&EventLabels { event }).clone();
        let bytes = |direction| moved.get_or_create(&DirectionLabels { direction }).clone();
        Self {
            accepted: event("accepted"),
            no_orig_dst: event("no_orig_dst"),
            no_route: event("no_route"),
            connect_failed: event("connect_failed"),
            refused: event("refused"),
            retries: event("retries"),
            forwarded: event("forwarded"),
            active,
            io_errors: event("io_errors"),
            idle_closed: event("idle_closed"),
            headers_too_large: event("headers_too_large"),
            headers_too_large_logged: OncePerClient::default(),
            bytes_to_endpoint: bytes("to_endpoint"),
            bytes_to_client: bytes("to_client"),
            mirrored: event("mirrored"),
            mirror_failed: event("mirror_failed"),
            mirror_skipped: event("mirror_skipped"),
        }
    }
}

/// The client addresses a refusal was logged for, so that it is logged
/// once per client, not once per request: at most [`OncePerClient::CAP`]
/// are kept, and all forgotten past that (each may then be logged once
/// more).
#[derive(Debug, Default, Clone)]
pub struct OncePerClient(Arc<Mutex<HashSet<IpAddr>>>);

impl OncePerClient {
    pub const CAP: usize = 4096;

    /// Whether `client` is seen for the first time (and so is logged).
    pub fn first(&self, client: IpAddr) -> bool {
        let mut seen = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.contains(&client) {
            return false;
        }
        if seen.len() >= Self::CAP {
            seen.clear();
        }
        seen.insert(client)
    }
}

#[derive(Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ProxySnapshot {
    pub accepted: u64,
    pub no_orig_dst: u64,
    pub no_route: u64,
    pub connect_failed: u64,
    pub refused: u64,
    pub retries: u64,
    pub forwarded: u64,
    pub active: u64,
    pub io_errors: u64,
    /// Absent from the stats of a daemon older than this field.
    #[serde(default)]
    pub idle_closed: u64,
    pub bytes_to_endpoint: u64,
    pub bytes_to_client: u64,
    /// Absent from the stats of a daemon older than these fields.
    #[serde(default)]
    pub mirrored: u64,
    #[serde(default)]
    pub mirror_failed: u64,
    #[serde(default)]
    pub mirror_skipped: u64,
    #[serde(default)]
    pub headers_too_large: u64,
}

impl ProxyCounters {
    /// `/stats`' `proxy` object.
    pub fn snapshot(&self) -> ProxySnapshot {
        ProxySnapshot {
            accepted: self.accepted.get(),
            no_orig_dst: self.no_orig_dst.get(),
            no_route: self.no_route.get(),
            connect_failed: self.connect_failed.get(),
            refused: self.refused.get(),
            retries: self.retries.get(),
            forwarded: self.forwarded.get(),
            active: self.active.get().max(0) as u64,
            io_errors: self.io_errors.get(),
            idle_closed: self.idle_closed.get(),
            bytes_to_endpoint: self.bytes_to_endpoint.get(),
            bytes_to_client: self.bytes_to_client.get(),
            mirrored: self.mirrored.get(),
            mirror_failed: self.mirror_failed.get(),
            mirror_skipped: self.mirror_skipped.get(),
            headers_too_large: self.headers_too_large.get(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_client_is_logged_once_and_the_set_stays_bounded() {
        let once = OncePerClient::default();
        let ip = |n: u32| IpAddr::from(std::net::Ipv4Addr::from(0x0af4_0000 + n));
        assert!(once.first(ip(1)), "a new client");
        assert!(!once.first(ip(1)), "the same client again");
        assert!(once.first(ip(2)), "another client");
        for n in 3..=OncePerClient::CAP as u32 {
            assert!(once.first(ip(n)));
        }
        assert!(!once.first(ip(1)), "still remembered at the cap");
        assert!(once.first(ip(0)), "past the cap: a new client is logged");
        assert!(once.first(ip(1)), "and the others forgotten");
        assert!(once.0.lock().unwrap().len() <= OncePerClient::CAP);
    }
}
