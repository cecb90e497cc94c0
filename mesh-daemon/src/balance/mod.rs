//! Endpoint selection: shared per-endpoint state ([`endpoint`]), the
//! selection rules ([`select`]: priority failover, fail-open, weighted P2C
//! over peak-EWMA load), passive health ([`breaker`]) and backoff. The
//! slot tables of in-kernel balancing are part of the model
//! (`model::slots`): capacity planning sizes them.
#![forbid(unsafe_code)]

pub mod backoff;
pub mod breaker;
pub mod endpoint;
pub mod ewma;
pub mod select;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

pub use endpoint::{BalanceConfig, EndpointState, EndpointView};

use select::{Candidate, Eligible};
use tokio::time::Instant;

/// An endpoint of a route, as picking sees it.
pub trait Member {
    fn weight(&self) -> u16;
    fn priority(&self) -> u8;
    fn state(&self) -> &EndpointState;
}

/// Most endpoints whose breaker probe other connections may claim during
/// one pick before it gives up (each claim is a race lost by microseconds).
const MAX_CLAIMED: usize = 8;

/// Members whose candidates one pick keeps on the stack.
const SEEN: usize = 64;

/// The endpoint for a new connection among `members` (see [`select`]),
/// leaving out the addresses in `tried`; claims the breaker's probe if
/// one is due. Allocates nothing: a connection and each of its retries
/// cost passes over the members and two load reads.
pub fn pick<M: Member>(
    members: &[M],
    fail_open: bool,
    tried: &[SocketAddr],
    now: Instant,
    mut rng: impl FnMut() -> f64,
) -> Option<usize> {
    let mut claimed = [usize::MAX; MAX_CLAIMED];
    let mut n_claimed = 0;
    // Each member's candidate is read once per round (reading it takes the
    // endpoint's lock): kept on the stack for up to SEEN members, read
    // again per pass for larger services.
    let mut seen = [Candidate { weight: 0, priority: 0, available: false }; SEEN];
    loop {
        let read = |i: usize| {
            let m = &members[i];
            let skip = claimed[..n_claimed].contains(&i) || tried.contains(&m.state().addr);
            Candidate {
                weight: if skip { 0 } else { m.weight() },
                priority: m.priority(),
                available: m.state().available(now),
            }
        };
        let stacked = members.len() <= SEEN;
        if stacked {
            for (i, c) in seen.iter_mut().enumerate().take(members.len()) {
                *c = read(i);
            }
        }
        let cand = |i: usize| if stacked { seen[i] } else { read(i) };
        let rule = Eligible::of((0..members.len()).map(cand), fail_open);
        let i = select::p2c_by(
            members.len(),
            |i| {
                let c = cand(i);
                rule.admits(&c).then_some(c.weight)
            },
            |i| members[i].state().load(members[i].weight()),
            &mut rng,
        )?;
        let st = members[i].state();
        // Failing open goes to ejected endpoints too: no probe to claim.
        if st.admit(now) || !st.available(now) {
            return Some(i);
        }
        if n_claimed == MAX_CLAIMED {
            return None;
        }
        claimed[n_claimed] = i;
        n_claimed += 1;
    }
}

/// The weights the balancer gives `members` now (rules 1-3): what
/// `meshctl get endpoints` and the kernel slot tables show. `available`
/// says which may take traffic (kernel mode: the active checks only).
pub fn effective_weights<M>(members: &[M], fail_open: bool, candidate: impl Fn(&M) -> Candidate) -> Vec<u16> {
    let cands: Vec<Candidate> = members.iter().map(candidate).collect();
    select::effective_weights(&cands, fail_open)
}

/// The state of every endpoint address in use, kept across state writes
/// so latency, breakers and health survive an `apply`.
#[derive(Debug, Default)]
pub struct Registry {
    cfg: BalanceConfig,
    states: Mutex<HashMap<SocketAddr, Arc<EndpointState>>>,
}

impl Registry {
    pub fn new(cfg: BalanceConfig) -> Self {
        Self { cfg, states: Mutex::new(HashMap::new()) }
    }

    pub fn get(&self, addr: SocketAddr) -> Arc<EndpointState> {
        let mut m = self.states.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(addr).or_insert_with(|| Arc::new(EndpointState::new(addr, &self.cfg))).clone()
    }

    /// Forgets addresses no longer in use.
    pub fn retain(&self, keep: &HashSet<SocketAddr>) {
        self.states.lock().unwrap_or_else(|p| p.into_inner()).retain(|a, _| keep.contains(a));
    }

    /// Forgets `gone` (addresses a write took out of use).
    pub fn forget(&self, gone: &[SocketAddr]) {
        let mut m = self.states.lock().unwrap_or_else(|p| p.into_inner());
        for a in gone {
            m.remove(a);
        }
    }

    /// Actively healthy, for addresses known; unknown ones are healthy.
    pub fn actively_healthy(&self, addr: SocketAddr) -> bool {
        self.states.lock().unwrap_or_else(|p| p.into_inner()).get(&addr).is_none_or(|s| s.actively_healthy())
    }
}
