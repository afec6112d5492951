//! Choosing the hosts of one request by the service's policy: a primary, then distinct fallbacks
//! drawn by the same policy from the hosts not yet chosen.

use std::collections::HashMap;

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
    /// The power of two random choices: of two hosts drawn at random, the one with fewer
    /// requests in flight (counted across every worker).
    LeastRequest,
}

impl Policy {
    pub fn name(self) -> &'static str {
        match self {
            Policy::Random => "random",
            Policy::WeightedRandom => "weighted_random",
            Policy::LeastRequest => "least_request",
        }
    }
}

/// One routable instance.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Host {
    /// `ip:port`, as Envoy names a cluster member.
    pub address: String,
    pub weight: u32,
    pub zone: Option<String>,
    /// Milliseconds since the Unix epoch, when the registrar says.
    pub registered_at: Option<i64>,
}

/// What orders a request's hosts besides the policy.
#[derive(Clone, Default)]
pub struct Preferences<'a> {
    /// Hosts tried after all others (ejected ones)...
    pub avoid: Vec<&'a str>,
    /// ...unless they are more than this share of the service.
    pub max_avoided_share: f64,
    /// The caller's zone: its hosts come first while there are at least `min_zone_hosts` of
    /// them (not ejected); otherwise every zone is alike.
    pub zone: Option<&'a str>,
    pub min_zone_hosts: usize,
    /// Warm-up: a host registered less than `warmup_ms` before `now_ms` gets a share in
    /// proportion to its age (0 turns it off).
    pub warmup_ms: u64,
    pub now_ms: u64,
    /// Requests in flight at a host, for `least_request`.
    pub load: Option<&'a dyn Fn(&str) -> u64>,
}

/// A host's share under warm-up, in thousandths: linear in its age over the window, at least 1.
fn warmup_permille(host: &Host, preferences: &Preferences<'_>) -> u64 {
    let Some(registered_at) = host.registered_at else {
        return 1_000;
    };
    let age = (preferences.now_ms as i64)
        .saturating_sub(registered_at)
        .max(0) as u64;
    if preferences.warmup_ms == 0 || age >= preferences.warmup_ms {
        1_000
    } else {
        (1_000 * age / preferences.warmup_ms).max(1)
    }
}

/// The hosts of a service, with what the policies need precomputed when the list changes rather
/// than on every request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Hosts {
    hosts: Vec<Host>,
    /// `cumulative[i]` is the sum of the weights of hosts `0..=i`.
    cumulative: Vec<u64>,
    /// Where each address is in `hosts`.
    positions: HashMap<String, usize>,
    /// The latest registration time of any host: past it plus the warm-up window, no host is
    /// warming up and the fast path applies.
    newest_registration: Option<i64>,
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
        let positions = hosts
            .iter()
            .enumerate()
            .map(|(i, host)| (host.address.clone(), i))
            .collect();
        let newest_registration = hosts.iter().filter_map(|host| host.registered_at).max();
        Hosts {
            hosts,
            cumulative,
            positions,
            newest_registration,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    pub fn addresses(&self) -> impl Iterator<Item = &str> {
        self.hosts.iter().map(|host| host.address.as_str())
    }

    /// Up to `count` distinct hosts in the order they are to be tried, by `policy` and the
    /// `preferences`: hosts of the caller's zone first (while it has enough of them), ejected
    /// hosts last, and hosts still warming up with a share that grows with their age.
    pub fn choose_with(
        &self,
        policy: Policy,
        count: usize,
        preferences: &Preferences<'_>,
        rng: &mut impl Rng,
    ) -> Vec<&Host> {
        let mut avoided: Vec<usize> = preferences
            .avoid
            .iter()
            .filter_map(|address| self.positions.get(*address).copied())
            .collect();
        if avoided.len() as f64 > preferences.max_avoided_share * self.hosts.len() as f64 {
            avoided.clear();
        }
        let warming = preferences.warmup_ms > 0
            && self.newest_registration.is_some_and(|newest| {
                newest.saturating_add(preferences.warmup_ms as i64) > preferences.now_ms as i64
            });
        let usable = |i: &usize| !avoided.contains(i);
        let local: Vec<usize> = match preferences.zone {
            Some(zone) => (0..self.hosts.len())
                .filter(|i| usable(i) && self.hosts[*i].zone.as_deref() == Some(zone))
                .collect(),
            None => Vec::new(),
        };
        let zoned = !local.is_empty() && local.len() >= preferences.min_zone_hosts;
        let least_request = policy == Policy::LeastRequest && preferences.load.is_some();
        if avoided.is_empty() && !warming && !zoned && !least_request {
            return self.choose(policy, count, rng);
        }
        let others: Vec<usize> = (0..self.hosts.len())
            .filter(|i| usable(i) && !(zoned && local.contains(i)))
            .collect();
        let tiers = [if zoned { local } else { Vec::new() }, others, avoided];
        let weighted = warming || policy == Policy::WeightedRandom;
        let weight = |i: usize| {
            let host = &self.hosts[i];
            let base = match policy {
                Policy::WeightedRandom => u64::from(host.weight),
                Policy::Random | Policy::LeastRequest => 1,
            };
            base * warmup_permille(host, preferences)
        };
        let mut chosen = Vec::with_capacity(count);
        for tier in &tiers {
            let more = count - chosen.len();
            match preferences.load.filter(|_| least_request) {
                Some(load) => chosen.extend(self.least_loaded(tier, load, more, rng)),
                None => chosen.extend(self.draw_among(tier, weighted, weight, more, rng)),
            }
        }
        chosen.into_iter().map(|i| &self.hosts[i]).collect()
    }

    /// Up to `count` of the hosts at `among`, each the less loaded of two drawn at random from
    /// those not chosen yet.
    fn least_loaded(
        &self,
        among: &[usize],
        load: &dyn Fn(&str) -> u64,
        count: usize,
        rng: &mut impl Rng,
    ) -> Vec<usize> {
        let mut rest = among.to_vec();
        let mut chosen = Vec::with_capacity(count.min(rest.len()));
        while chosen.len() < count && !rest.is_empty() {
            let pick = if rest.len() == 1 {
                0
            } else {
                let pair = index::sample(rng, rest.len(), 2);
                let (a, b) = (pair.index(0), pair.index(1));
                let load_of = |k: usize| load(&self.hosts[rest[k]].address);
                if load_of(b) < load_of(a) {
                    b
                } else {
                    a
                }
            };
            chosen.push(rest.swap_remove(pick));
        }
        chosen
    }

    /// Up to `count` of the hosts at `among`, drawn one after the other: in proportion to
    /// `weight` when `weighted` (those of weight 0 only if all are), uniformly otherwise.
    fn draw_among(
        &self,
        among: &[usize],
        weighted: bool,
        weight: impl Fn(usize) -> u64,
        count: usize,
        rng: &mut impl Rng,
    ) -> Vec<usize> {
        if !weighted || among.iter().all(|&i| weight(i) == 0) {
            let amount = count.min(among.len());
            return index::sample(rng, among.len(), amount)
                .into_iter()
                .map(|k| among[k])
                .collect();
        }
        let mut rest: Vec<usize> = among.iter().copied().filter(|&i| weight(i) > 0).collect();
        let mut chosen = Vec::with_capacity(count.min(rest.len()));
        while chosen.len() < count && !rest.is_empty() {
            let total: u64 = rest.iter().map(|&i| weight(i)).sum();
            let mut point = rng.random_range(0..total);
            let mut at = rest.len() - 1;
            for (k, &i) in rest.iter().enumerate() {
                if point < weight(i) {
                    at = k;
                    break;
                }
                point -= weight(i);
            }
            chosen.push(rest.swap_remove(at));
        }
        chosen
    }

    /// Up to `count` distinct hosts in the order they are to be tried.
    pub fn choose(&self, policy: Policy, count: usize, rng: &mut impl Rng) -> Vec<&Host> {
        let total = self.cumulative.last().copied().unwrap_or(0);
        let chosen = match policy {
            Policy::WeightedRandom if total > 0 => self.weighted(total, count, rng),
            Policy::Random | Policy::WeightedRandom | Policy::LeastRequest => {
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
                    ..Host::default()
                })
                .collect(),
        )
    }

    fn avoiding<'a>(hosts: &[&'a str]) -> Preferences<'a> {
        Preferences {
            avoid: hosts.to_vec(),
            max_avoided_share: 0.5,
            ..Preferences::default()
        }
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

    /// Asserts that `counts` fit `shares` at significance 0.001.
    fn assert_fits(counts: &[u64], shares: &[f64]) {
        let chi_square = fits(counts, shares);
        assert!(
            chi_square < CRITICAL[counts.len() - 2],
            "chi-square {chi_square} for {counts:?}, expected shares {shares:?}"
        );
    }

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
        assert_fits(&counts, &[0.2; 5]);
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
        assert_fits(&counts, &shares);
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
        assert_fits(&counts[..3], &[1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]);
    }

    #[test]
    fn avoided_hosts_are_tried_last() {
        let mut rng = SmallRng::seed_from_u64(13);
        for policy in [Policy::Random, Policy::WeightedRandom] {
            let four = hosts(&[1, 2, 3, 4]);
            for _ in 0..500 {
                let chosen = four.choose_with(policy, 4, &avoiding(&["10.0.0.3:80"]), &mut rng);
                assert_eq!(chosen.len(), 4);
                assert_eq!(chosen[3].address, "10.0.0.3:80", "{policy:?}");
            }
            let three = four.choose_with(policy, 3, &avoiding(&["10.0.0.3:80"]), &mut rng);
            assert!(three.iter().all(|host| host.address != "10.0.0.3:80"));
        }
    }

    #[test]
    fn the_preferred_hosts_keep_the_policys_proportions() {
        let four = hosts(&[1, 2, 3, 4]);
        let mut counts = [0u64; 4];
        let mut rng = SmallRng::seed_from_u64(17);
        for _ in 0..30_000 {
            let first = four.choose_with(
                Policy::WeightedRandom,
                3,
                &avoiding(&["10.0.0.3:80"]),
                &mut rng,
            )[0];
            counts[index_of(first)] += 1;
        }
        assert_eq!(counts[3], 0);
        assert_fits(&counts[..3], &[1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]);
    }

    #[test]
    fn past_the_panic_share_avoidance_is_ignored() {
        let four = hosts(&[1, 1, 1, 1]);
        let mut rng = SmallRng::seed_from_u64(19);
        let avoid = ["10.0.0.0:80", "10.0.0.1:80", "10.0.0.2:80"];
        let firsts: HashSet<String> = (0..400)
            .map(|_| {
                four.choose_with(Policy::Random, 3, &avoiding(&avoid), &mut rng)[0]
                    .address
                    .clone()
            })
            .collect();
        assert_eq!(
            firsts.len(),
            4,
            "three of four avoided is past half: all stay first"
        );
    }

    /// Hosts 0 and 1 in zone "a", 2 and 3 in "b".
    fn zoned(weights: &[u32], registered_at: &[Option<i64>]) -> Hosts {
        Hosts::new(
            weights
                .iter()
                .zip(registered_at)
                .enumerate()
                .map(|(i, (&weight, &registered_at))| Host {
                    address: format!("10.0.0.{i}:80"),
                    weight,
                    zone: Some(if i < 2 { "a" } else { "b" }.to_string()),
                    registered_at,
                })
                .collect(),
        )
    }

    #[test]
    fn the_callers_zone_comes_first_and_spills_over_when_too_small() {
        let four = zoned(&[1, 1, 1, 1], &[None; 4]);
        let mut rng = SmallRng::seed_from_u64(23);
        let in_zone = |min_zone_hosts, avoid: &[&'static str]| Preferences {
            zone: Some("a"),
            min_zone_hosts,
            avoid: avoid.to_vec(),
            max_avoided_share: 0.5,
            ..Preferences::default()
        };
        for _ in 0..500 {
            let chosen = four.choose_with(Policy::Random, 3, &in_zone(2, &[]), &mut rng);
            let zones: Vec<usize> = chosen.iter().map(|host| index_of(host) / 2).collect();
            assert_eq!(&zones[..2], [0, 0], "zone a first");
            assert_eq!(zones[2], 1, "then a fallback from zone b");
        }
        // One of the two hosts of zone a ejected: too few left to prefer the zone.
        let mut counts = [0u64; 4];
        for _ in 0..20_000 {
            let first =
                four.choose_with(Policy::Random, 3, &in_zone(2, &["10.0.0.0:80"]), &mut rng)[0];
            counts[index_of(first)] += 1;
        }
        assert_eq!(counts[0], 0, "the ejected host is not first");
        assert_fits(&counts[1..], &[1.0 / 3.0; 3]);
    }

    #[test]
    fn a_warming_host_gets_a_share_in_proportion_to_its_age() {
        // Host 0 registered a quarter of the window ago, the others long before.
        let now = 1_000_000;
        let window = 600_000;
        let hosts = zoned(
            &[1, 1, 1, 1],
            &[Some(now - window / 4), Some(0), Some(0), None],
        );
        let preferences = Preferences {
            warmup_ms: window as u64,
            now_ms: now as u64,
            ..Preferences::default()
        };
        let mut counts = [0u64; 4];
        let mut rng = SmallRng::seed_from_u64(29);
        for _ in 0..40_000 {
            counts[index_of(hosts.choose_with(Policy::Random, 2, &preferences, &mut rng)[0])] += 1;
        }
        // Shares 0.25 : 1 : 1 : 1.
        let shares = [0.25 / 3.25, 1.0 / 3.25, 1.0 / 3.25, 1.0 / 3.25];
        assert_fits(&counts, &shares);
        // Past the window, all alike again.
        let later = Preferences {
            now_ms: (now + window) as u64,
            ..preferences
        };
        let mut counts = [0u64; 4];
        for _ in 0..40_000 {
            counts[index_of(hosts.choose_with(Policy::Random, 2, &later, &mut rng)[0])] += 1;
        }
        assert_fits(&counts, &[0.25; 4]);
    }

    #[test]
    fn least_request_prefers_the_less_loaded_of_two() {
        let four = hosts(&[1, 1, 1, 1]);
        // Host 3 carries 10 requests, the others none.
        let load = |address: &str| if address == "10.0.0.3:80" { 10 } else { 0 };
        let preferences = Preferences {
            load: Some(&load),
            ..Preferences::default()
        };
        let mut counts = [0u64; 4];
        let mut rng = SmallRng::seed_from_u64(31);
        for _ in 0..30_000 {
            let chosen = four.choose_with(Policy::LeastRequest, 3, &preferences, &mut rng);
            assert_eq!(chosen.len(), 3);
            counts[index_of(chosen[0])] += 1;
        }
        // The loaded host is first only when it is drawn twice, which two distinct draws never
        // do: never first. The others are alike (each 1/3).
        assert_eq!(counts[3], 0, "{counts:?}");
        assert_fits(&counts[..3], &[1.0 / 3.0; 3]);
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
