//! Which endpoint takes a new connection.
//!
//! 1. Only endpoints with weight above 0 are considered.
//! 2. Priority failover: the best (lowest) priority level that has an
//!    available endpoint takes all new connections; the others take none.
//! 3. No endpoint available at any level: fail open (all of them are
//!    candidates), unless the service says `failOpen: false` (none is).
//! 4. Power of two choices: two distinct candidates are drawn, each with
//!    probability proportional to its weight, and the one with the lower
//!    `load / weight` wins, where `load = ewma_rtt * (in_flight + 1)`
//!    (peak-EWMA of connect time, see [`super::ewma`]). Under concurrency
//!    this sends traffic in proportion to weight when latencies are equal,
//!    and away from endpoints that answer slowly.
//!    When both drawn endpoints are idle, `/ weight` would hand every
//!    connection to the heavier one and microseconds of connect jitter
//!    would decide between equals; so then the faster one wins only if the
//!    other's latency is clearly higher (by more than 25% and more than
//!    1 ms; both measured, so a new endpoint is not starved by its
//!    default), and otherwise the first drawn (already weight-proportional)
//!    wins.

/// One endpoint as selection sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub weight: u16,
    pub priority: u8,
    pub available: bool,
}

/// Indices of the endpoints that may take new connections (rules 1-3).
pub fn eligible(c: &[Candidate], fail_open: bool) -> Vec<usize> {
    let weighted = || c.iter().enumerate().filter(|(_, e)| e.weight > 0);
    let best = weighted().filter(|(_, e)| e.available).map(|(_, e)| e.priority).min();
    match best {
        Some(level) => weighted().filter(|(_, e)| e.available && e.priority == level).map(|(i, _)| i).collect(),
        None if fail_open => weighted().map(|(i, _)| i).collect(),
        None => Vec::new(),
    }
}

/// Kernel-mode slot weights: the configured weight for eligible endpoints
/// (rules 1-3, with `available` meaning actively healthy), 0 otherwise.
pub fn effective_weights(c: &[Candidate], fail_open: bool) -> Vec<u16> {
    let mut w = vec![0; c.len()];
    for i in eligible(c, fail_open) {
        w[i] = c[i].weight;
    }
    w
}

/// One eligible endpoint's inputs to rule 4.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Load {
    pub weight: u16,
    /// Peak-EWMA connect time, in nanoseconds.
    pub rtt: f64,
    /// Whether `rtt` was measured (else it is the default).
    pub measured: bool,
    pub in_flight: u64,
}

/// Idle endpoints: latency decides only past this ratio...
const CLEARLY_SLOWER: f64 = 1.25;
/// ...and this gap (1 ms): below it, connect times differ by noise.
const NOISE_NS: f64 = 1_000_000.0;

/// Rule 4 over the eligible endpoints; `rng` gives uniform numbers in
/// [0, 1). Returns an index into `cands`.
pub fn p2c(cands: &[Load], mut rng: impl FnMut() -> f64) -> Option<usize> {
    let total: f64 = cands.iter().map(|c| f64::from(c.weight)).sum();
    let draw = |skip: Option<usize>, total: f64, r: f64| -> usize {
        let mut x = r * total;
        let mut last = 0;
        for (i, c) in cands.iter().enumerate() {
            if Some(i) == skip {
                continue;
            }
            last = i;
            x -= f64::from(c.weight);
            if x < 0.0 {
                return i;
            }
        }
        last
    };
    match cands.len() {
        0 => None,
        1 => Some(0),
        _ => {
            let a = draw(None, total, rng());
            let b = draw(Some(a), total - f64::from(cands[a].weight), rng());
            let (ca, cb) = (cands[a], cands[b]);
            if ca.in_flight == 0 && cb.in_flight == 0 {
                let b_clearly_faster =
                    ca.measured && cb.measured && ca.rtt > cb.rtt * CLEARLY_SLOWER && ca.rtt - cb.rtt > NOISE_NS;
                return Some(if b_clearly_faster { b } else { a });
            }
            // An endpoint not measured yet competes on load alone against a
            // measured one: its default latency is a guess, and judged by
            // it a new endpoint would get nothing under load until an
            // active check measured it (or forever, with checks off).
            let (ra, rb) = match (ca.measured, cb.measured) {
                (true, false) => (ca.rtt, ca.rtt),
                (false, true) => (cb.rtt, cb.rtt),
                _ => (ca.rtt, cb.rtt),
            };
            let cost = |rtt: f64, c: Load| rtt * (c.in_flight + 1) as f64 / f64::from(c.weight.max(1));
            Some(if cost(rb, cb) < cost(ra, ca) { b } else { a })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(weight: u16, priority: u8, available: bool) -> Candidate {
        Candidate { weight, priority, available }
    }

    /// Picks `picks` times with `concurrency` requests outstanding; the
    /// next one to finish is drawn with probability proportional to
    /// 1/latency. Returns each endpoint's share of picks.
    fn simulate(weights: &[u16], latency_ms: &[f64], picks: usize, concurrency: usize) -> Vec<f64> {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut in_flight = vec![0u64; weights.len()];
        let mut outstanding: Vec<usize> = Vec::new();
        let mut count = vec![0usize; weights.len()];
        for n in 0..picks + concurrency {
            if outstanding.len() == concurrency {
                let total: f64 = outstanding.iter().map(|i| 1.0 / latency_ms[*i]).sum();
                let mut x = rng.f64() * total;
                let k = outstanding.iter().position(|i| {
                    x -= 1.0 / latency_ms[*i];
                    x < 0.0
                });
                let done = outstanding.swap_remove(k.unwrap_or(0));
                in_flight[done] -= 1;
            }
            if n >= picks {
                continue;
            }
            let cands: Vec<Load> = weights
                .iter()
                .zip(&in_flight)
                .zip(latency_ms)
                .map(|((w, f), l)| Load { weight: *w, rtt: *l * 1e6, measured: true, in_flight: *f })
                .collect();
            let i = p2c(&cands, || rng.f64()).unwrap();
            in_flight[i] += 1;
            outstanding.push(i);
            count[i] += 1;
        }
        count.iter().map(|c| *c as f64 * 100.0 / picks as f64).collect()
    }

    #[test]
    fn equal_latency_follows_weights_3_to_2() {
        let share = simulate(&[3, 2], &[5.0, 5.0], 10_000, 30);
        assert!((share[0] - 60.0).abs() <= 2.0 && (share[1] - 40.0).abs() <= 2.0, "{share:?}");
        let share = simulate(&[1, 1, 1], &[5.0, 5.0, 5.0], 10_000, 30);
        assert!(share.iter().all(|s| (s - 33.3).abs() <= 2.0), "{share:?}");
    }

    #[test]
    fn slower_endpoint_gets_fewer_picks() {
        let share = simulate(&[1, 1], &[5.0, 50.0], 10_000, 30);
        assert!(share[1] < 35.0, "a 10x slower endpoint still got {:.1}%", share[1]);
    }

    fn load(weight: u16, rtt: f64, in_flight: u64) -> Load {
        Load { weight, rtt, measured: true, in_flight }
    }

    #[test]
    fn p2c_edge_cases() {
        assert_eq!(p2c(&[], || 0.5), None);
        assert_eq!(p2c(&[load(5, 1.0, 0)], || 0.5), Some(0));
        // Under load, the lower load per weight wins whatever the order.
        assert_eq!(p2c(&[load(1, 10.0, 1), load(1, 1.0, 1)], || 0.0), Some(1));
        assert_eq!(p2c(&[load(1, 1.0, 1), load(1, 10.0, 1)], || 0.9), Some(0));
        // Idle: a clearly slower endpoint loses, near-equals go by the draw.
        let ms = 1e6;
        assert_eq!(p2c(&[load(1, 10.0 * ms, 0), load(1, ms, 0)], || 0.0), Some(1));
        assert_eq!(p2c(&[load(1, 1.1 * ms, 0), load(1, ms, 0)], || 0.0), Some(0));
        // Idle: three times slower but by 0.2 ms is noise, not a reason.
        assert_eq!(p2c(&[load(1, 0.3 * ms, 0), load(1, 0.1 * ms, 0)], || 0.0), Some(0));
        // Idle: a default (unmeasured) latency does not starve a new endpoint.
        let new = Load { measured: false, ..load(1, 30.0 * ms, 0) };
        assert_eq!(p2c(&[new, load(1, ms, 0)], || 0.0), Some(0));
        // Under load neither: it competes on load, so an idle new endpoint
        // beats a busy measured one, and a busier new one loses.
        assert_eq!(p2c(&[load(1, ms, 1), new], || 0.0), Some(1));
        let busy_new = Load { in_flight: 3, ..new };
        assert_eq!(p2c(&[busy_new, load(1, ms, 1)], || 0.0), Some(1));
    }

    #[test]
    fn idle_picks_follow_weights() {
        // One request at a time: nothing is ever in flight at a pick.
        let share = simulate(&[3, 2], &[5.0, 5.2], 10_000, 1);
        assert!((share[0] - 60.0).abs() <= 2.0, "{share:?}");
    }

    #[test]
    fn best_priority_with_an_available_endpoint_takes_all() {
        let c = [cand(1, 0, true), cand(1, 0, false), cand(1, 1, true), cand(0, 0, true)];
        assert_eq!(eligible(&c, true), [0], "level 0 has an available endpoint; weight 0 never");
        let down = [cand(1, 0, false), cand(1, 0, false), cand(2, 1, true), cand(3, 1, true), cand(1, 2, true)];
        assert_eq!(eligible(&down, true), [2, 3], "level 0 is down: level 1 serves");
        assert_eq!(effective_weights(&down, true), [0, 0, 2, 3, 0]);
    }

    #[test]
    fn fail_open_unless_told_otherwise() {
        let all_down = [cand(1, 0, false), cand(2, 1, false), cand(0, 0, false)];
        assert_eq!(eligible(&all_down, true), [0, 1], "fail open: every weighted endpoint");
        assert!(eligible(&all_down, false).is_empty(), "failOpen: false: none");
        assert_eq!(effective_weights(&all_down, false), [0, 0, 0]);
    }
}
