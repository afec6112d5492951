//! Choosing the hosts of one request: a uniformly random primary, then distinct random fallbacks.

use rand::seq::index;
use rand::Rng;

/// Picks `min(count, hosts.len())` distinct hosts in random order.
///
/// Every host is equally likely in every position, so the primary (entry 0, the first attempt) is
/// uniform over the service with P = 1/N, and each retry goes to a host not yet tried.
pub fn choose_candidates<'a, T>(hosts: &'a [T], count: usize, rng: &mut impl Rng) -> Vec<&'a T> {
    let amount = count.min(hosts.len());
    index::sample(rng, hosts.len(), amount)
        .into_iter()
        .map(|i| &hosts[i])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;
    use std::collections::HashSet;

    #[test]
    fn candidates_are_distinct_and_capped_by_the_service_size() {
        let hosts = ["a", "b", "c", "d"];
        let mut rng = SmallRng::seed_from_u64(7);
        for _ in 0..1_000 {
            let chosen = choose_candidates(&hosts, 3, &mut rng);
            assert_eq!(chosen.len(), 3);
            assert_eq!(chosen.iter().collect::<HashSet<_>>().len(), 3);
        }
        assert_eq!(choose_candidates(&hosts[..2], 3, &mut rng).len(), 2);
        assert!(choose_candidates::<&str>(&[], 3, &mut rng).is_empty());
    }

    /// Chi-square goodness of fit of the primary against P = 1/N, at significance 0.001.
    #[test]
    fn primary_is_uniform() {
        let hosts: Vec<usize> = (0..5).collect();
        let mut counts = [0u64; 5];
        let mut rng = SmallRng::seed_from_u64(42);
        let draws = 50_000;
        for _ in 0..draws {
            counts[*choose_candidates(&hosts, 3, &mut rng)[0]] += 1;
        }
        let expected = draws as f64 / hosts.len() as f64;
        let chi_square: f64 = counts
            .iter()
            .map(|&observed| (observed as f64 - expected).powi(2) / expected)
            .sum();
        // Critical value of chi-square with 4 degrees of freedom at p = 0.001.
        assert!(
            chi_square < 18.467,
            "chi-square {chi_square} for counts {counts:?}"
        );
    }

    #[test]
    fn every_host_appears_as_a_fallback() {
        let hosts = ["a", "b", "c"];
        let mut rng = SmallRng::seed_from_u64(1);
        let mut seen_last = HashSet::new();
        for _ in 0..300 {
            seen_last.insert(*choose_candidates(&hosts, 3, &mut rng)[2]);
        }
        assert_eq!(seen_last.len(), 3);
    }
}
