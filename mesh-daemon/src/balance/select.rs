//! Which endpoint takes a new connection or request.
//!
//! 1. Only endpoints with weight above 0 are considered.
//! 2. Priority failover: the best (lowest) priority level that has an
//!    available endpoint takes all new connections; the others take none.
//! 3. No endpoint available at any level: fail open (all of them are
//!    candidates), unless the service says `failOpen: false` (none is).
//! 4. Power of two choices: two distinct candidates are drawn, each with
//!    probability proportional to its weight, and the one with the lower
//!    `load / weight` wins, where `load = ewma_rtt * (in_flight + 1)`
//!    (peak-EWMA of connect time, or of time to response headers for
//!    requests, see [`super::ewma`]). Under concurrency this sends traffic
//!    in proportion to weight when latencies are equal, and away from
//!    endpoints that answer slowly: their requests stay in flight longer.
//!    When both drawn endpoints are idle, the first drawn (already
//!    weight-proportional) wins: `/ weight` would hand everything to the
//!    heavier one, and comparing latencies would let one slow sample (a
//!    new connection, a pause) send all light traffic to the other, which
//!    then alone is measured again: the slower one would starve.

/// One endpoint as selection sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub weight: u16,
    pub priority: u8,
    pub available: bool,
}

/// Which endpoints rules 1-3 let take new connections, found in one pass
/// without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eligible {
    /// The best priority level with an available weighted endpoint: its
    /// available weighted endpoints.
    Level(u8),
    /// None available, failing open: every weighted endpoint.
    All,
    None,
}

impl Eligible {
    pub fn of(c: impl Iterator<Item = Candidate>, fail_open: bool) -> Self {
        let mut weighted = false;
        let mut best: Option<u8> = None;
        for e in c.filter(|e| e.weight > 0) {
            weighted = true;
            if e.available {
                best = Some(best.map_or(e.priority, |b| b.min(e.priority)));
            }
        }
        match best {
            Some(level) => Eligible::Level(level),
            None if fail_open && weighted => Eligible::All,
            None => Eligible::None,
        }
    }

    pub fn admits(self, e: &Candidate) -> bool {
        e.weight > 0
            && match self {
                Eligible::Level(l) => e.available && e.priority == l,
                Eligible::All => true,
                Eligible::None => false,
            }
    }
}

/// Indices of the endpoints that may take new connections (rules 1-3).
#[cfg(test)]
pub fn eligible(c: &[Candidate], fail_open: bool) -> Vec<usize> {
    let rule = Eligible::of(c.iter().copied(), fail_open);
    c.iter().enumerate().filter(|(_, e)| rule.admits(e)).map(|(i, _)| i).collect()
}

/// Kernel-mode slot weights and the weights `meshctl get endpoints` shows:
/// the configured weight for eligible endpoints (rules 1-3), 0 otherwise.
pub fn effective_weights(c: &[Candidate], fail_open: bool) -> Vec<u16> {
    let rule = Eligible::of(c.iter().copied(), fail_open);
    c.iter().map(|e| if rule.admits(e) { e.weight } else { 0 }).collect()
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

/// Rule 4 over the eligible endpoints; `rng` gives uniform numbers in
/// [0, 1). Returns an index into `cands`.
#[cfg(test)]
pub fn p2c(cands: &[Load], rng: impl FnMut() -> f64) -> Option<usize> {
    p2c_by(cands.len(), |i| Some(cands[i].weight), |i| cands[i], rng)
}

/// Rule 4 without a list: `weight(i)` is the weight of endpoint `i` if it
/// is eligible (None otherwise), `load(i)` is asked only of the two drawn.
/// Two passes over `n` and no allocation. Returns the chosen index.
pub fn p2c_by(
    n: usize,
    weight: impl Fn(usize) -> Option<u16>,
    load: impl Fn(usize) -> Load,
    mut rng: impl FnMut() -> f64,
) -> Option<usize> {
    let (mut total, mut count, mut only) = (0.0, 0usize, None);
    for (i, wt) in (0..n).filter_map(|i| weight(i).map(|w| (i, f64::from(w)))) {
        total += wt;
        count += 1;
        only = Some(i);
    }
    // A weighted draw over the eligible endpoints, leaving out `skip`;
    // returns the index and its weight.
    let draw = |skip: Option<usize>, total: f64, r: f64| -> Option<(usize, f64)> {
        let mut x = r * total;
        let mut last = None;
        for (i, wt) in (0..n).filter(|i| Some(*i) != skip).filter_map(|i| weight(i).map(|w| (i, f64::from(w)))) {
            last = Some((i, wt));
            x -= wt;
            if x < 0.0 {
                return last;
            }
        }
        last
    };
    match count {
        0 => None,
        1 => only,
        _ => {
            let (a, wa) = draw(None, total, rng())?;
            let (b, _) = draw(Some(a), total - wa, rng())?;
            Some(if prefer_second(load(a), load(b)) { b } else { a })
        }
    }
}

/// Whether the second of two drawn endpoints wins (rule 4).
fn prefer_second(ca: Load, cb: Load) -> bool {
    if ca.in_flight == 0 && cb.in_flight == 0 {
        return false;
    }
    // An endpoint not measured yet competes on load alone against a
    // measured one: its default latency is a guess, and judged by it a new
    // endpoint would get nothing under load until an active check measured
    // it (or forever, with checks off).
    let (ra, rb) = match (ca.measured, cb.measured) {
        (true, false) => (ca.rtt, ca.rtt),
        (false, true) => (cb.rtt, cb.rtt),
        _ => (ca.rtt, cb.rtt),
    };
    let cost = |rtt: f64, c: Load| rtt * (c.in_flight + 1) as f64 / f64::from(c.weight.max(1));
    cost(rb, cb) < cost(ra, ca)
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
        // Idle: the draw decides, whatever the latencies (one slow sample
        // must not starve an endpoint of light traffic).
        let ms = 1e6;
        assert_eq!(p2c(&[load(1, 10.0 * ms, 0), load(1, ms, 0)], || 0.0), Some(0));
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
