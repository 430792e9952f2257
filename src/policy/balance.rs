//! Load balancing (`strategy.mode: "loadbalance"`): which target gets a request's first attempt.
//! Each available target with a weight above 0 is picked in proportion to its weight; the rest
//! of the chain, in configured order, are its fallbacks.

use crate::policy::chain::Hop;

/// The hop to try first among `candidates` (hop index, weight): `roll` is uniform in
/// `0..total weight` (the caller's random source). `None` when no candidate has weight.
pub fn pick(candidates: &[(usize, u32)], roll: u64) -> Option<usize> {
    let mut left = roll;
    for &(hop, weight) in candidates {
        let weight = u64::from(weight);
        if left < weight {
            return Some(hop);
        }
        left -= weight;
    }
    None
}

/// The sum of the candidates' weights: the range `pick`'s `roll` is drawn from.
pub fn total(candidates: &[(usize, u32)]) -> u64 {
    candidates.iter().map(|&(_, w)| u64::from(w)).sum()
}

/// The chain with hop `first` moved to the front, the others keeping their order.
pub fn first_then_the_rest(mut hops: Vec<Hop>, first: usize) -> Vec<Hop> {
    if first < hops.len() {
        let hop = hops.remove(first);
        hops.insert(0, hop);
    }
    hops
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn each_candidate_is_picked_in_proportion_to_its_weight() {
        let candidates = [(0, 3), (1, 0), (2, 1)];
        assert_eq!(total(&candidates), 4);
        let picks: Vec<Option<usize>> = (0..5).map(|roll| pick(&candidates, roll)).collect();
        assert_eq!(picks, vec![Some(0), Some(0), Some(0), Some(2), None]);
        assert_eq!(pick(&[], 0), None);
        assert_eq!(pick(&[(4, 0)], 0), None);
    }

    #[test]
    fn a_seeded_source_splits_three_to_one() {
        let candidates = [(0, 3), (1, 1)];
        let mut rng = fastrand::Rng::with_seed(7);
        let mut counts = [0u32; 2];
        for _ in 0..10_000 {
            let roll = rng.u64(0..total(&candidates));
            let hop = pick(&candidates, roll).unwrap();
            counts[hop] += 1;
        }
        // 7,500 expected, standard deviation about 43.
        assert!((7_300..=7_700).contains(&counts[0]), "{counts:?}");
    }

    #[test]
    fn the_pick_goes_first_and_the_rest_keep_their_order() {
        let hop = |target| Hop {
            target,
            max_tries: 1,
            timeout: Duration::from_secs(1),
        };
        let order = |hops: Vec<Hop>| hops.iter().map(|h| h.target).collect::<Vec<_>>();
        assert_eq!(
            order(first_then_the_rest(vec![hop(0), hop(1), hop(2)], 2)),
            vec![2, 0, 1]
        );
        assert_eq!(
            order(first_then_the_rest(vec![hop(0), hop(1)], 0)),
            vec![0, 1]
        );
        assert_eq!(order(first_then_the_rest(vec![hop(0)], 5)), vec![0]);
    }
}
