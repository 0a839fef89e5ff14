//! Closed-form bandwidth load balancing for the butterfly all-reduce.
//!
//! The reference solves a linear program: minimise ξ subject to
//! `(1 + (n − 2)·w_i) / b_i ≤ ξ`, `Σ w_i = 1`, `w_i ≥ 0`, `w_i = 0` when `b_i = 0`.
//! For a fixed ξ the best shares are `w_i(ξ) = max(0, (ξ·b_i − 1)/(n − 2))`, which
//! grow with ξ, so the optimum is the unique ξ with `Σ w_i(ξ) = 1`: water-filling
//! over the peers sorted by bandwidth. Fractions become integers by the
//! largest-remainder method, so the split is exact and sums to the vector size.

use crate::error::{AveragingError, Result};

/// Split `vector_size` elements among peers with the given bandwidths.
///
/// `None` means "unknown": such peers get the mean of the known positive
/// bandwidths (or 1 if none is known). `Some(0.0)` (client mode) gets nothing.
/// Peers whose share is below `min_size` elements get nothing, provided some peer
/// is above it.
///
/// # Errors
/// [`AveragingError::InvalidGroup`] when no peer can reduce (all bandwidths zero)
/// or a bandwidth is negative or not finite.
pub fn load_balance_peers(
    vector_size: usize,
    bandwidths: &[Option<f64>],
    min_size: usize,
) -> Result<Vec<usize>> {
    let n = bandwidths.len();
    if n == 0 {
        return Err(AveragingError::InvalidGroup {
            reason: "empty group".into(),
        });
    }
    for b in bandwidths.iter().flatten() {
        if !b.is_finite() || *b < 0.0 {
            return Err(AveragingError::InvalidGroup {
                reason: format!("bandwidth {b} is not a finite non-negative number"),
            });
        }
    }
    let b = filled(bandwidths);
    if b.iter().all(|b| *b == 0.0) {
        return Err(AveragingError::InvalidGroup {
            reason: "cannot run all-reduce without reducers (all bandwidths are 0)".into(),
        });
    }
    let mut shares = optimal_shares(&b);
    let threshold = min_size as f64 / vector_size.max(1) as f64;
    if shares.iter().any(|s| *s >= threshold) {
        for s in shares.iter_mut() {
            if *s < threshold {
                *s = 0.0;
            }
        }
        let total: f64 = shares.iter().sum();
        for s in shares.iter_mut() {
            *s /= total;
        }
    }
    Ok(largest_remainder(vector_size, &shares))
}

/// The split a round uses: [`load_balance_peers`]' LP optimum with no
/// member above [`MAX_SHARE_FACTOR`] times an equal share (see
/// [`cap_shares`]). Every member computes it from the same sanitized hints
/// ([`crate::AssembledGroup::bandwidths`]), so all agree on the spans.
///
/// # Errors
/// As [`load_balance_peers`].
pub fn balance_spans(
    vector_size: usize,
    bandwidths: &[Option<f64>],
    min_size: usize,
) -> Result<Vec<usize>> {
    let sizes = load_balance_peers(vector_size, bandwidths, min_size)?;
    let b = filled(bandwidths);
    let total = vector_size.max(1) as f64;
    let mut shares: Vec<f64> = sizes.iter().map(|s| *s as f64 / total).collect();
    let before = shares.clone();
    cap_shares(&mut shares, &b);
    if shares == before {
        return Ok(sizes);
    }
    Ok(largest_remainder(vector_size, &shares))
}

/// No member reduces more than this multiple of an equal share.
pub const MAX_SHARE_FACTOR: f64 = 2.0;

/// Bandwidths are self-declared and a reducer decides the averages of its
/// span, so no member may take more than [`MAX_SHARE_FACTOR`] times an
/// equal share of the vector among the members that can reduce (`b > 0`),
/// whatever the LP would give it: the excess goes to the others in
/// proportion to their bandwidth. (The LP alone hands the whole vector to a
/// member declaring a few times the others' bandwidth.) With two or fewer
/// reducers the cap does not bind.
fn cap_shares(shares: &mut [f64], b: &[f64]) {
    let eligible = b.iter().filter(|x| **x > 0.0).count();
    let cap = MAX_SHARE_FACTOR / eligible.max(1) as f64;
    if cap >= 1.0 {
        return;
    }
    let mut capped = vec![false; shares.len()];
    for _ in 0..shares.len() {
        let mut excess = 0.0;
        for (i, s) in shares.iter_mut().enumerate() {
            if *s > cap {
                excess += *s - cap;
                *s = cap;
                capped[i] = true;
            }
        }
        if excess <= 0.0 {
            return;
        }
        let open: f64 = (0..shares.len())
            .filter(|&i| !capped[i] && b[i] > 0.0)
            .map(|i| b[i])
            .sum();
        if open <= 0.0 {
            return;
        }
        for i in 0..shares.len() {
            if !capped[i] && b[i] > 0.0 {
                shares[i] += excess * b[i] / open;
            }
        }
    }
}

/// Bandwidths with unknown ones set to the mean of the known positive ones
/// (or 1 if none is known).
fn filled(bandwidths: &[Option<f64>]) -> Vec<f64> {
    let known: Vec<f64> = bandwidths
        .iter()
        .flatten()
        .copied()
        .filter(|b| *b > 0.0)
        .collect();
    let fill = if known.is_empty() {
        1.0
    } else {
        known.iter().sum::<f64>() / known.len() as f64
    };
    bandwidths.iter().map(|b| b.unwrap_or(fill)).collect()
}

/// The LP optimum as fractions summing to 1 (`b` has at least one positive entry).
fn optimal_shares(b: &[f64]) -> Vec<f64> {
    let n = b.len();
    let positive: f64 = b.iter().sum();
    if n <= 2 {
        // With two peers the cost no longer depends on the shares; split by bandwidth.
        return b.iter().map(|x| x / positive).collect();
    }
    let k_scale = (n - 2) as f64;
    let mut order: Vec<usize> = (0..n).filter(|&i| b[i] > 0.0).collect();
    order.sort_by(|&x, &y| b[y].total_cmp(&b[x]).then(x.cmp(&y)));
    let mut xi = f64::INFINITY;
    let mut prefix = 0.0;
    for (k, &i) in order.iter().enumerate() {
        prefix += b[i];
        let candidate = (k_scale + (k + 1) as f64) / prefix;
        // Valid while the smallest active peer still gets a non-negative share.
        if candidate * b[i] >= 1.0 {
            xi = candidate;
        } else {
            break;
        }
    }
    let mut shares: Vec<f64> = b
        .iter()
        .map(|&bi| ((xi * bi - 1.0) / k_scale).max(0.0))
        .collect();
    let total: f64 = shares.iter().sum();
    for s in shares.iter_mut() {
        *s /= total;
    }
    shares
}

/// Round fractions to integers summing exactly to `total` (Hamilton's method; ties
/// go to the lower index so every peer computes the same split).
pub(crate) fn largest_remainder(total: usize, fractions: &[f64]) -> Vec<usize> {
    let exact: Vec<f64> = fractions.iter().map(|f| f * total as f64).collect();
    let mut out: Vec<usize> = exact.iter().map(|x| x.floor() as usize).collect();
    let assigned: usize = out.iter().sum();
    let mut remaining = total.saturating_sub(assigned);
    let mut order: Vec<usize> = (0..fractions.len())
        .filter(|&i| fractions[i] > 0.0)
        .collect();
    order.sort_by(|&x, &y| {
        let rx = exact[x] - exact[x].floor();
        let ry = exact[y] - exact[y].floor();
        ry.total_cmp(&rx).then(x.cmp(&y))
    });
    let mut idx = 0;
    while remaining > 0 && !order.is_empty() {
        out[order[idx % order.len()]] += 1;
        remaining -= 1;
        idx += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_bandwidths_split_equally() {
        let split = load_balance_peers(1000, &[None, None, None, None], 0).unwrap();
        assert_eq!(split, vec![250, 250, 250, 250]);
    }

    #[test]
    fn water_filling_matches_hand_solution() {
        // n = 4, b = [1,2,3,4]: ξ = 5/9 with the top three active, shares
        // (ξ·b − 1)/2 = 0, 1/18, 6/18, 11/18.
        let split =
            load_balance_peers(18_000, &[Some(1.0), Some(2.0), Some(3.0), Some(4.0)], 0).unwrap();
        assert_eq!(split, vec![0, 1000, 6000, 11_000]);
    }

    #[test]
    fn clients_get_nothing_and_unknown_gets_mean() {
        let split = load_balance_peers(900, &[Some(0.0), None, Some(1.0), Some(0.0)], 0).unwrap();
        assert_eq!(split, vec![0, 450, 450, 0]);
    }

    #[test]
    fn rounding_is_exact_and_deterministic() {
        let split = load_balance_peers(10, &[None, None, None], 0).unwrap();
        assert_eq!(split, vec![4, 3, 3]);
        assert_eq!(split.iter().sum::<usize>(), 10);
    }

    #[test]
    fn min_vector_size_zeroes_small_shares() {
        let split = load_balance_peers(18_000, &[Some(1.0), Some(2.0), Some(3.0), Some(4.0)], 2000)
            .unwrap();
        assert_eq!(split[0], 0);
        assert_eq!(split[1], 0);
        assert_eq!(split.iter().sum::<usize>(), 18_000);
        // 6/17 and 11/17 of 18000 after renormalisation, rounded by largest remainder.
        assert_eq!(split, vec![0, 0, 6353, 11_647]);
    }

    #[test]
    fn no_member_takes_more_than_twice_an_equal_share() {
        // The LP gives everything to the two fastest; capped at 2/5 each,
        // the rest goes to the others by bandwidth.
        let b = [
            Some(100.0),
            Some(100.0),
            Some(100.0),
            Some(400.0),
            Some(175.0),
        ];
        assert_eq!(load_balance_peers(1000, &b, 0).unwrap()[..3], [0, 0, 0]);
        let sizes = balance_spans(1000, &b, 0).unwrap();
        assert_eq!(sizes.iter().sum::<usize>(), 1000);
        assert!(sizes.iter().all(|s| *s <= 400), "{sizes:?}");
        assert!(sizes[..3].iter().all(|s| *s > 0), "{sizes:?}");
        // Clients still get nothing.
        let sizes = balance_spans(1000, &[Some(0.0), Some(1.0), Some(1.0), Some(1e9)], 0).unwrap();
        assert_eq!(sizes[0], 0);
        assert!(sizes[3] <= 667, "{sizes:?}");
    }

    #[test]
    fn two_peers_split_by_bandwidth() {
        let split = load_balance_peers(300, &[Some(1.0), Some(2.0)], 0).unwrap();
        assert_eq!(split, vec![100, 200]);
    }

    #[test]
    fn no_reducers_is_an_error() {
        assert!(load_balance_peers(10, &[Some(0.0), Some(0.0)], 0).is_err());
        assert!(load_balance_peers(10, &[Some(-1.0), Some(1.0)], 0).is_err());
    }

    #[test]
    fn split_minimises_the_lp_objective() {
        // Compare against a brute-force grid search on 3 active peers of 5.
        let b = [2.0, 5.0, 0.0, 3.0, 1.0];
        let n = b.len() as f64;
        let split = load_balance_peers(1_000_000, &b.map(Some), 0).unwrap();
        let cost = |w: &[f64]| {
            w.iter()
                .zip(b)
                .filter(|(_, bi)| *bi > 0.0)
                .map(|(wi, bi)| (1.0 + (n - 2.0) * wi) / bi)
                .fold(0.0, f64::max)
        };
        let ours: Vec<f64> = split.iter().map(|s| *s as f64 / 1e6).collect();
        let mut best = f64::INFINITY;
        let steps = 40;
        for a in 0..=steps {
            for c in 0..=(steps - a) {
                for d in 0..=(steps - a - c) {
                    let e = steps - a - c - d;
                    let w = [a, c, 0, d, e].map(|x| x as f64 / steps as f64);
                    best = best.min(cost(&w));
                }
            }
        }
        assert!(
            cost(&ours) <= best + 1e-6,
            "ours {} best {}",
            cost(&ours),
            best
        );
    }
}
