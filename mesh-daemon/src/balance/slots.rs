//! Slot tables for in-kernel balancing: connect4 picks a random slot, so
//! each endpoint's share of slots is its share of new connections.
//!
//! Slots are given in proportion to weight with largest-remainder rounding:
//! each endpoint first gets `floor(w * S / W)` slots, then the slots left
//! go one each to the endpoints with the largest remainders (ties: earlier
//! endpoint first). Weight 0 gets no slot. The table has `size` slots, or
//! one per endpoint if there are more endpoints than that.

/// For each slot, the index of the endpoint it points to.
pub fn layout(weights: &[u16], size: u32) -> Vec<usize> {
    let live: Vec<(usize, u64)> =
        weights.iter().enumerate().filter(|(_, w)| **w > 0).map(|(i, w)| (i, u64::from(*w))).collect();
    if live.is_empty() {
        return Vec::new();
    }
    let slots = crate::model::capacity::slot_table_len(live.len(), size) as u64;
    let total: u64 = live.iter().map(|(_, w)| w).sum();
    let mut counts: Vec<(usize, u64, u64)> =
        live.iter().map(|(i, w)| (*i, w * slots / total, w * slots % total)).collect();
    let left = slots - counts.iter().map(|c| c.1).sum::<u64>();
    let mut by_remainder: Vec<usize> = (0..counts.len()).collect();
    by_remainder.sort_by(|a, b| counts[*b].2.cmp(&counts[*a].2).then(a.cmp(b)));
    for k in by_remainder.into_iter().take(left as usize) {
        counts[k].1 += 1;
    }
    counts.iter().flat_map(|(i, n, _)| std::iter::repeat_n(*i, *n as usize)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares(weights: &[u16], size: u32) -> Vec<usize> {
        let t = layout(weights, size);
        (0..weights.len()).map(|i| t.iter().filter(|s| **s == i).count()).collect()
    }

    #[test]
    fn three_to_two_over_256_is_154_to_102() {
        assert_eq!(shares(&[3, 2], 256), [154, 102]);
    }

    #[test]
    fn weight_zero_gets_no_slot() {
        assert_eq!(shares(&[3, 0, 2], 256), [154, 0, 102]);
        assert!(layout(&[0, 0], 256).is_empty());
        assert!(layout(&[], 256).is_empty());
    }

    #[test]
    fn table_is_exactly_the_size_and_rounding_is_fair() {
        assert_eq!(shares(&[1, 1, 1], 256), [86, 85, 85]);
        assert_eq!(layout(&[7, 11, 13], 256).len(), 256);
        assert_eq!(shares(&[65535, 1], 256), [256, 0], "a tiny weight can round to nothing");
    }

    #[test]
    fn more_endpoints_than_slots_gives_each_one() {
        let w = vec![1u16; 300];
        assert_eq!(layout(&w, 256).len(), 300);
        assert!(shares(&w, 256).iter().all(|n| *n == 1));
    }
}
