//! Slot tables for in-kernel balancing: connect4 picks a random slot, so
//! each endpoint's share of slots is its share of new connections.
//!
//! A table is as small as its weights allow ([`table_len`]): exact when the
//! weights, divided by their greatest common divisor, sum to at most the
//! cap (`--slot-table-size`): ten endpoints of weight 1 take ten slots,
//! 3:2 takes five. Otherwise it is the smallest size that keeps every
//! endpoint's share of slots within [`SHARE_ERROR`] of its share of
//! weight, or the cap when none below it does. With more endpoints than
//! the cap, each gets one slot.
//!
//! Slots are given in proportion to weight with largest-remainder rounding:
//! each endpoint first gets `floor(w * S / W)` slots, then the slots left
//! go one each to the endpoints with the largest remainders (ties: earlier
//! endpoint first). Weight 0 gets no slot.

/// The most an endpoint's share of slots may differ from its share of
/// weight when a table cannot be exact: half a percentage point.
pub const SHARE_ERROR: f64 = 0.005;

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Slots of each endpoint in a table of `slots` slots (largest remainder).
fn counts(live: &[u64], slots: u64) -> Vec<u64> {
    let total: u64 = live.iter().sum();
    let mut c: Vec<(u64, u64)> = live.iter().map(|w| (w * slots / total, w * slots % total)).collect();
    let left = slots - c.iter().map(|x| x.0).sum::<u64>();
    let mut by_remainder: Vec<usize> = (0..c.len()).collect();
    by_remainder.sort_by(|a, b| c[*b].1.cmp(&c[*a].1).then(a.cmp(b)));
    for k in by_remainder.into_iter().take(left as usize) {
        c[k].0 += 1;
    }
    c.into_iter().map(|x| x.0).collect()
}

/// The weights above 0, widened.
fn live(weights: &[u16]) -> Vec<u64> {
    weights.iter().filter(|w| **w > 0).map(|w| u64::from(*w)).collect()
}

/// The exact table length of `live` weights: their sum over their gcd.
fn exact_len(live: &[u64]) -> u64 {
    let g = live.iter().fold(0, |g, w| gcd(g, *w)).max(1);
    live.iter().map(|w| w / g).sum()
}

/// Slots in the table of `weights` under cap `size` (see the module doc);
/// 0 when no weight is above 0.
pub fn table_len(weights: &[u16], size: u32) -> usize {
    let live = live(weights);
    let (n, cap) = (live.len() as u64, u64::from(size));
    if n == 0 {
        return 0;
    }
    if n >= cap {
        return n as usize;
    }
    let exact = exact_len(&live);
    if exact <= cap {
        return exact as usize;
    }
    let total: u64 = live.iter().sum();
    let within = |s: u64| {
        counts(&live, s)
            .iter()
            .zip(&live)
            .all(|(c, w)| (*c as f64 / s as f64 - *w as f64 / total as f64).abs() <= SHARE_ERROR)
    };
    (n..cap).find(|s| within(*s)).unwrap_or(cap) as usize
}

/// The most slots a table of a service with configured `weights` can take
/// under cap `size`, whatever subset health leaves: the exact length when
/// it fits (a subset's exact length is never larger), else the cap (or
/// one per endpoint when there are more).
pub fn table_bound(weights: &[u16], size: u32) -> usize {
    let live = live(weights);
    let (n, cap) = (live.len() as u64, u64::from(size));
    match n {
        0 => 0,
        n if n >= cap => n as usize,
        _ => exact_len(&live).min(cap) as usize,
    }
}

/// For each slot, the index of the endpoint it points to.
pub fn layout(weights: &[u16], size: u32) -> Vec<usize> {
    let idx: Vec<usize> = weights.iter().enumerate().filter(|(_, w)| **w > 0).map(|(i, _)| i).collect();
    let slots = table_len(weights, size) as u64;
    if slots == 0 {
        return Vec::new();
    }
    let c = counts(&live(weights), slots);
    idx.iter().zip(c).flat_map(|(i, n)| std::iter::repeat_n(*i, n as usize)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares(weights: &[u16], size: u32) -> Vec<usize> {
        let t = layout(weights, size);
        (0..weights.len()).map(|i| t.iter().filter(|s| **s == i).count()).collect()
    }

    #[test]
    fn a_table_is_exact_and_as_small_as_the_weights_allow() {
        assert_eq!(shares(&[3, 2], 256), [3, 2]);
        assert_eq!(shares(&[1; 10], 256), [1; 10]);
        assert_eq!(shares(&[100, 100, 200], 256), [1, 1, 2], "divided by their gcd");
        assert_eq!(shares(&[3, 0, 2], 256), [3, 0, 2], "weight 0 gets no slot");
        assert!(layout(&[0, 0], 256).is_empty());
        assert!(layout(&[], 256).is_empty());
    }

    #[test]
    fn weights_that_cannot_be_exact_get_the_smallest_table_within_the_stated_error() {
        // 100:101:102 sum to 303 > 256 and share no divisor.
        let w = [100u16, 101, 102];
        let len = table_len(&w, 256);
        assert!(len < 256, "{len}");
        let total: f64 = w.iter().map(|x| f64::from(*x)).sum();
        for (c, wi) in shares(&w, 256).iter().zip(w) {
            assert!((*c as f64 / len as f64 - f64::from(wi) / total).abs() <= SHARE_ERROR);
        }
        // No smaller table is within it.
        assert!(!(3..len as u64).any(|s| {
            counts(&[100, 101, 102], s)
                .iter()
                .zip(w)
                .all(|(c, wi)| (*c as f64 / s as f64 - f64::from(wi) / total).abs() <= SHARE_ERROR)
        }));
        // A weight below the error rounds to nothing, in a small table.
        assert_eq!(shares(&[65535, 1], 256), [2, 0]);
        // Weights no table under the cap follows within the error: the cap.
        assert_eq!(table_len(&[7, 11, 13], 16), 16);
    }

    #[test]
    fn more_endpoints_than_the_cap_get_one_slot_each() {
        let w = vec![1u16; 300];
        assert_eq!(layout(&w, 256).len(), 300);
        assert!(shares(&w, 256).iter().all(|n| *n == 1));
    }

    #[test]
    fn the_bound_covers_every_subset_health_can_leave() {
        let weights: [&[u16]; 5] = [&[3, 2, 7, 5], &[1; 10], &[100, 101, 102], &[2, 4, 6, 9], &[40, 60, 90, 11]];
        for w in weights {
            let bound = table_bound(w, 256);
            // Every subset (by bitmask) of the weights.
            for mask in 0u32..(1 << w.len()) {
                let sub: Vec<u16> =
                    w.iter().enumerate().map(|(i, x)| if mask >> i & 1 == 1 { *x } else { 0 }).collect();
                assert!(table_len(&sub, 256) <= bound, "{w:?} subset {sub:?}: {} > {bound}", table_len(&sub, 256));
            }
        }
        assert_eq!(table_bound(&[1; 10], 256), 10);
        assert_eq!(table_bound(&[0, 0], 256), 0);
    }
}
