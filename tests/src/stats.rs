//! Chi-square goodness-of-fit for distribution claims.

/// Critical values of the chi-square distribution at significance 0.001, for 1..=10 degrees of
/// freedom.
const CRITICAL_AT_0_001: [f64; 10] = [
    10.828, 13.816, 16.266, 18.467, 20.515, 22.458, 24.322, 26.124, 27.877, 29.588,
];

/// The chi-square statistic of `observed` counts against equal expected counts.
pub fn chi_square_uniform(observed: &[u64]) -> f64 {
    chi_square(observed, &equal_shares(observed.len()))
}

/// Whether `observed` is consistent with a uniform distribution at significance 0.001.
pub fn is_uniform(observed: &[u64]) -> bool {
    fits_shares(observed, &equal_shares(observed.len()))
}

fn equal_shares(count: usize) -> Vec<f64> {
    vec![1.0 / count as f64; count]
}

/// The chi-square statistic of `observed` counts against the expected `shares` (summing to 1).
pub fn chi_square(observed: &[u64], shares: &[f64]) -> f64 {
    let total: u64 = observed.iter().sum();
    observed
        .iter()
        .zip(shares)
        .map(|(&count, share)| {
            let expected = total as f64 * share;
            (count as f64 - expected).powi(2) / expected
        })
        .sum()
}

/// Whether `observed` is consistent with `shares` at significance 0.001.
pub fn fits_shares(observed: &[u64], shares: &[f64]) -> bool {
    let degrees_of_freedom = observed.len() - 1;
    assert!(
        (1..=CRITICAL_AT_0_001.len()).contains(&degrees_of_freedom),
        "no critical value for {degrees_of_freedom} degrees of freedom"
    );
    chi_square(observed, shares) < CRITICAL_AT_0_001[degrees_of_freedom - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_counts_pass_and_skewed_counts_fail() {
        assert!(is_uniform(&[1000, 1000, 1000]));
        assert!(is_uniform(&[980, 1030, 990]));
        assert!(!is_uniform(&[1200, 900, 900]));
        assert!(!is_uniform(&[1500, 1500, 0]));
    }

    #[test]
    fn weighted_counts_are_checked_against_their_shares() {
        assert!(fits_shares(&[1000, 2000, 5000], &[0.125, 0.25, 0.625]));
        assert!(!fits_shares(&[2667, 2667, 2666], &[0.125, 0.25, 0.625]));
    }

    #[test]
    fn statistic_matches_a_worked_example() {
        // (10-20)^2/20 + (30-20)^2/20 + 0 = 10
        assert!((chi_square_uniform(&[10, 30, 20]) - 10.0).abs() < 1e-9);
    }
}
