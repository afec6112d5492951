//! Chi-square goodness-of-fit for distribution claims.

/// Critical values of the chi-square distribution at significance 0.001, for 1..=10 degrees of
/// freedom.
const CRITICAL_AT_0_001: [f64; 10] = [
    10.828, 13.816, 16.266, 18.467, 20.515, 22.458, 24.322, 26.124, 27.877, 29.588,
];

/// The chi-square statistic of `observed` counts against equal expected counts.
pub fn chi_square_uniform(observed: &[u64]) -> f64 {
    let total: u64 = observed.iter().sum();
    let expected = total as f64 / observed.len() as f64;
    observed
        .iter()
        .map(|&count| (count as f64 - expected).powi(2) / expected)
        .sum()
}

/// Whether `observed` is consistent with a uniform distribution at significance 0.001.
pub fn is_uniform(observed: &[u64]) -> bool {
    let degrees_of_freedom = observed.len() - 1;
    assert!(
        (1..=CRITICAL_AT_0_001.len()).contains(&degrees_of_freedom),
        "no critical value for {degrees_of_freedom} degrees of freedom"
    );
    chi_square_uniform(observed) < CRITICAL_AT_0_001[degrees_of_freedom - 1]
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
    fn statistic_matches_a_worked_example() {
        // (10-20)^2/20 + (30-20)^2/20 + 0 = 10
        assert!((chi_square_uniform(&[10, 30, 20]) - 10.0).abs() < 1e-9);
    }
}
