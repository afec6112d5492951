//! Choosing the hosts of one request by the service's policy: a primary, then distinct fallbacks
//! drawn by the same policy from the hosts not yet chosen.

use rand::seq::index;
use rand::Rng;
use serde::Deserialize;

/// How the hosts of a request are drawn.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Every host equally likely: P = 1/N.
    #[default]
    Random,
    /// P proportional to the host's registry weight. Hosts of weight 0 get no traffic, unless
    /// every host of the service has weight 0, when they are drawn uniformly.
    WeightedRandom,
}

/// One routable instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Host {
    /// `ip:port`, as Envoy names a cluster member.
    pub address: String,
    pub weight: u32,
}

/// The hosts of a service, with what the policies need precomputed when the list changes rather
/// than on every request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Hosts {
    hosts: Vec<Host>,
    /// `cumulative[i]` is the sum of the weights of hosts `0..=i`.
    cumulative: Vec<u64>,
}

/// Draws that hit a host already chosen before an exact draw over the rest takes over.
const MAX_REDRAWS: usize = 16;

impl Hosts {
    pub fn new(hosts: Vec<Host>) -> Hosts {
        let cumulative = hosts
            .iter()
            .scan(0u64, |sum, host| {
                *sum += u64::from(host.weight);
                Some(*sum)
            })
            .collect();
        Hosts { hosts, cumulative }
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    pub fn addresses(&self) -> impl Iterator<Item = &str> {
        self.hosts.iter().map(|host| host.address.as_str())
    }

    /// Up to `count` distinct hosts in the order they are to be tried.
    pub fn choose(&self, policy: Policy, count: usize, rng: &mut impl Rng) -> Vec<&Host> {
        let total = self.cumulative.last().copied().unwrap_or(0);
        let chosen = match policy {
            Policy::WeightedRandom if total > 0 => self.weighted(total, count, rng),
            Policy::Random | Policy::WeightedRandom => {
                let amount = count.min(self.hosts.len());
                index::sample(rng, self.hosts.len(), amount).into_vec()
            }
        };
        chosen.into_iter().map(|i| &self.hosts[i]).collect()
    }

    /// Successive draws proportional to weight among the hosts not chosen yet. A draw over all
    /// hosts that lands on one already chosen is drawn again (which keeps the proportions among
    /// the rest exact); after a few, an exact draw over the rest ends it.
    fn weighted(&self, total: u64, count: usize, rng: &mut impl Rng) -> Vec<usize> {
        let eligible = self.hosts.iter().filter(|host| host.weight > 0).count();
        let amount = count.min(eligible);
        let mut chosen: Vec<usize> = Vec::with_capacity(amount);
        while chosen.len() < amount {
            let redrawn = (0..MAX_REDRAWS)
                .map(|_| {
                    let point = rng.random_range(0..total);
                    self.cumulative.partition_point(|&sum| sum <= point)
                })
                .find(|index| !chosen.contains(index));
            let next = redrawn.unwrap_or_else(|| self.weighted_among_rest(total, &chosen, rng));
            chosen.push(next);
        }
        chosen
    }

    fn weighted_among_rest(&self, total: u64, chosen: &[usize], rng: &mut impl Rng) -> usize {
        let taken: u64 = chosen
            .iter()
            .map(|&i| u64::from(self.hosts[i].weight))
            .sum();
        let mut point = rng.random_range(0..total - taken);
        let mut last = 0;
        for i in (0..self.hosts.len()).filter(|i| !chosen.contains(i)) {
            let weight = u64::from(self.hosts[i].weight);
            if point < weight {
                return i;
            }
            point -= weight;
            last = i;
        }
        // The point falls within the remaining weight, so this is not reached.
        last
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;
    use std::collections::HashSet;

    fn hosts(weights: &[u32]) -> Hosts {
        Hosts::new(
            weights
                .iter()
                .enumerate()
                .map(|(i, &weight)| Host {
                    address: format!("10.0.0.{i}:80"),
                    weight,
                })
                .collect(),
        )
    }

    fn index_of(host: &Host) -> usize {
        host.address
            .trim_start_matches("10.0.0.")
            .trim_end_matches(":80")
            .parse()
            .expect("an index")
    }

    /// Chi-square goodness of fit of `counts` against `expected` shares, at significance 0.001.
    fn fits(counts: &[u64], shares: &[f64]) -> f64 {
        let total: u64 = counts.iter().sum();
        counts
            .iter()
            .zip(shares)
            .map(|(&observed, share)| {
                let expected = total as f64 * share;
                (observed as f64 - expected).powi(2) / expected
            })
            .sum()
    }

    /// Critical values of chi-square at p = 0.001 for 1..=4 degrees of freedom.
    const CRITICAL: [f64; 4] = [10.828, 13.816, 16.266, 18.467];

    #[test]
    fn candidates_are_distinct_and_capped_by_the_service_size() {
        let mut rng = SmallRng::seed_from_u64(7);
        for policy in [Policy::Random, Policy::WeightedRandom] {
            let four = hosts(&[1, 2, 3, 4]);
            for _ in 0..1_000 {
                let chosen = four.choose(policy, 3, &mut rng);
                assert_eq!(chosen.len(), 3);
                assert_eq!(
                    chosen
                        .iter()
                        .map(|h| &h.address)
                        .collect::<HashSet<_>>()
                        .len(),
                    3
                );
            }
            assert_eq!(hosts(&[1, 1]).choose(policy, 3, &mut rng).len(), 2);
            assert!(hosts(&[]).choose(policy, 3, &mut rng).is_empty());
        }
    }

    #[test]
    fn random_primary_is_uniform() {
        let five = hosts(&[1, 9, 1, 1, 1]);
        let mut counts = [0u64; 5];
        let mut rng = SmallRng::seed_from_u64(42);
        for _ in 0..50_000 {
            counts[index_of(five.choose(Policy::Random, 3, &mut rng)[0])] += 1;
        }
        let chi_square = fits(&counts, &[0.2; 5]);
        assert!(
            chi_square < CRITICAL[3],
            "chi-square {chi_square} for {counts:?}"
        );
    }

    #[test]
    fn weighted_primary_follows_the_weights() {
        let weights = [1u32, 2, 3, 4];
        let four = hosts(&weights);
        let mut counts = [0u64; 4];
        let mut rng = SmallRng::seed_from_u64(11);
        for _ in 0..50_000 {
            counts[index_of(four.choose(Policy::WeightedRandom, 3, &mut rng)[0])] += 1;
        }
        let shares: Vec<f64> = weights.iter().map(|&w| f64::from(w) / 10.0).collect();
        let chi_square = fits(&counts, &shares);
        assert!(
            chi_square < CRITICAL[3],
            "chi-square {chi_square} for {counts:?}"
        );
    }

    /// The second candidate, given the first, is drawn in proportion to the remaining weights.
    #[test]
    fn weighted_fallbacks_follow_the_weights_of_the_rest() {
        let four = hosts(&[1, 2, 3, 4]);
        let mut counts = [0u64; 4];
        let mut rng = SmallRng::seed_from_u64(5);
        let mut draws = 0;
        while draws < 30_000 {
            let chosen = four.choose(Policy::WeightedRandom, 2, &mut rng);
            if index_of(chosen[0]) == 3 {
                counts[index_of(chosen[1])] += 1;
                draws += 1;
            }
        }
        assert_eq!(counts[3], 0);
        let chi_square = fits(&counts[..3], &[1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]);
        assert!(
            chi_square < CRITICAL[1],
            "chi-square {chi_square} for {counts:?}"
        );
    }

    #[test]
    fn weight_zero_gets_no_traffic_unless_every_host_has_it() {
        let mut rng = SmallRng::seed_from_u64(9);
        let mixed = hosts(&[0, 5, 0, 5]);
        for _ in 0..2_000 {
            let chosen = mixed.choose(Policy::WeightedRandom, 3, &mut rng);
            assert_eq!(chosen.len(), 2, "only the hosts with weight");
            assert!(chosen.iter().all(|host| host.weight > 0));
        }
        let zeros = hosts(&[0, 0, 0]);
        assert_eq!(zeros.choose(Policy::WeightedRandom, 3, &mut rng).len(), 3);
    }
}
