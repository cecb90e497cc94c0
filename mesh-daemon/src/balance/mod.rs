//! Endpoint selection: shared per-endpoint state ([`endpoint`]), the
//! selection rules ([`select`]: priority failover, fail-open, weighted P2C
//! over peak-EWMA load), passive health ([`breaker`]), backoff, and the
//! slot tables of in-kernel balancing ([`slots`]).
#![forbid(unsafe_code)]

pub mod backoff;
pub mod breaker;
pub mod endpoint;
pub mod ewma;
pub mod select;
pub mod slots;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddrV4;
use std::sync::{Arc, Mutex};

pub use endpoint::{BalanceConfig, EndpointState, EndpointView};

/// The state of every endpoint address in use, kept across state writes
/// so latency, breakers and health survive an `apply`.
#[derive(Debug, Default)]
pub struct Registry {
    cfg: BalanceConfig,
    states: Mutex<HashMap<SocketAddrV4, Arc<EndpointState>>>,
}

impl Registry {
    pub fn new(cfg: BalanceConfig) -> Self {
        Self { cfg, states: Mutex::new(HashMap::new()) }
    }

    pub fn get(&self, addr: SocketAddrV4) -> Arc<EndpointState> {
        let mut m = self.states.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(addr).or_insert_with(|| Arc::new(EndpointState::new(addr, &self.cfg))).clone()
    }

    /// Forgets addresses no longer in use.
    pub fn retain(&self, keep: &HashSet<SocketAddrV4>) {
        self.states.lock().unwrap_or_else(|p| p.into_inner()).retain(|a, _| keep.contains(a));
    }

    /// Actively healthy, for addresses known; unknown ones are healthy.
    pub fn actively_healthy(&self, addr: SocketAddrV4) -> bool {
        self.states.lock().unwrap_or_else(|p| p.into_inner()).get(&addr).is_none_or(|s| s.actively_healthy())
    }
}
