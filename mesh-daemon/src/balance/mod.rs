//! Endpoint selection: a rotation for the proxy (weights and health come
//! later) and the slot tables of in-kernel balancing.
#![forbid(unsafe_code)]

pub mod slots;

use std::sync::atomic::{AtomicUsize, Ordering};

/// Round-robin over a fixed list.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    /// The next of `n` choices, or None when there are none.
    pub fn pick(&self, n: usize) -> Option<usize> {
        (n > 0).then(|| self.next.fetch_add(1, Ordering::Relaxed) % n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_evenly_and_handles_empty() {
        let rr = RoundRobin::default();
        let mut counts = [0; 3];
        for _ in 0..300 {
            counts[rr.pick(3).unwrap()] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
        assert_eq!(rr.pick(0), None);
    }
}
