//! Host names in the registry, resolved to the IP addresses that Envoy's members and the
//! filter's candidates must be: Spring Cloud Zookeeper, for one, registers the host name unless
//! told to prefer IPs.
//!
//! [`Resolutions`] is the pure table the registry reads; [`Resolver`] looks names up (the
//! system's resolver, off the async threads), again every refresh interval, and sooner after a
//! failure, with a back-off.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

/// What each host name in use resolved to.
#[derive(Debug, Default)]
pub struct Resolutions {
    by_name: HashMap<String, Resolution>,
}

#[derive(Debug, Clone, PartialEq)]
struct Resolution {
    /// The address in use: the last one the name resolved to.
    address: Option<IpAddr>,
    /// Why the last lookup failed, when it did.
    failure: Option<String>,
}

impl Resolutions {
    /// Whether `name` has been looked up at least once.
    pub fn knows(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// Records a lookup of `name`; returns whether its address changed. A failure after a
    /// success keeps the last address: a resolver's hiccup must not take instances away.
    pub fn record(&mut self, name: &str, looked_up: Result<IpAddr, String>) -> bool {
        let entry = self.by_name.entry(name.to_string()).or_insert(Resolution {
            address: None,
            failure: None,
        });
        let before = entry.address;
        match looked_up {
            Ok(address) => {
                entry.address = Some(address);
                entry.failure = None;
            }
            Err(reason) => {
                if entry.failure.as_ref() != Some(&reason) {
                    tracing::warn!(host = name, %reason, kept = ?entry.address, "cannot resolve a registered host name");
                }
                entry.failure = Some(reason);
            }
        }
        entry.address != before
    }

    pub fn forget(&mut self, name: &str) {
        self.by_name.remove(name);
    }

    pub fn address(&self, name: &str) -> Option<IpAddr> {
        self.by_name.get(name)?.address
    }

    /// The names that have never resolved, with the reason.
    pub fn failures(&self) -> impl Iterator<Item = (&str, &str)> {
        self.by_name.iter().filter_map(|(name, resolution)| {
            match (&resolution.address, &resolution.failure) {
                (None, Some(reason)) => Some((name.as_str(), reason.as_str())),
                _ => None,
            }
        })
    }
}

/// The first address to connect to: IPv4 when the name has one (a registrar's host is more often
/// reachable over it than over a link-local or unrouted IPv6 address), IPv6 otherwise.
pub fn preferred(addresses: impl IntoIterator<Item = IpAddr>) -> Option<IpAddr> {
    let addresses: Vec<IpAddr> = addresses.into_iter().collect();
    addresses
        .iter()
        .find(|address| address.is_ipv4())
        .or_else(|| addresses.first())
        .copied()
}

/// How long one lookup may take before it counts as a failure.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// The first retry after a failure; each further failure doubles it, up to the refresh interval.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Lookups at once, so a registry of many names cannot flood the resolver.
const MAX_LOOKUPS: usize = 16;

/// When each name in use is due to be looked up, and the lookups under way.
pub struct Resolver {
    refresh: Duration,
    due: BTreeMap<String, Due>,
    running: HashSet<String>,
    lookups: JoinSet<(String, Result<IpAddr, String>)>,
}

#[derive(Debug, Clone, Copy)]
struct Due {
    at: Instant,
    failures: u32,
}

impl Resolver {
    pub fn new(refresh: Duration) -> Resolver {
        Resolver {
            refresh,
            due: BTreeMap::new(),
            running: HashSet::new(),
            lookups: JoinSet::new(),
        }
    }

    /// Follows the names in use: new ones are due at once, ones no longer used are dropped.
    pub fn track(&mut self, names: Vec<String>, now: Instant) {
        let names: HashSet<String> = names.into_iter().collect();
        self.due.retain(|name, _| names.contains(name));
        for name in names {
            self.due.entry(name).or_insert(Due {
                at: now,
                failures: 0,
            });
        }
    }

    /// When the next lookup is due, if one is waiting.
    pub fn next_due(&self) -> Option<Instant> {
        self.due
            .iter()
            .filter(|(name, _)| !self.running.contains(*name))
            .map(|(_, due)| due.at)
            .min()
    }

    /// Starts the lookups that are due, as many as may run at once.
    pub fn start_due(&mut self, now: Instant) {
        let due: Vec<String> = self
            .due
            .iter()
            .filter(|(name, due)| due.at <= now && !self.running.contains(*name))
            .map(|(name, _)| name.clone())
            .take(MAX_LOOKUPS.saturating_sub(self.running.len()))
            .collect();
        for name in due {
            self.running.insert(name.clone());
            self.lookups.spawn(async move {
                let looked_up = lookup(&name).await;
                (name, looked_up)
            });
        }
    }

    /// The next finished lookup; pending for ever while none runs.
    pub async fn finished(&mut self) -> (String, Result<IpAddr, String>) {
        loop {
            match self.lookups.join_next().await {
                Some(Ok((name, looked_up))) => {
                    self.running.remove(&name);
                    let now = Instant::now();
                    if let Some(due) = self.due.get_mut(&name) {
                        *due = next_lookup(*due, looked_up.is_ok(), self.refresh, now);
                    }
                    return (name, looked_up);
                }
                Some(Err(error)) => tracing::error!(%error, "a host name lookup failed to run"),
                None => std::future::pending::<()>().await,
            }
        }
    }
}

/// When a name is looked up again: a refresh interval after a success, sooner after a failure.
fn next_lookup(due: Due, succeeded: bool, refresh: Duration, now: Instant) -> Due {
    if succeeded {
        return Due {
            at: now + refresh,
            failures: 0,
        };
    }
    let backoff = FIRST_RETRY
        .saturating_mul(1 << due.failures.min(16))
        .min(refresh);
    Due {
        at: now + backoff,
        failures: due.failures + 1,
    }
}

async fn lookup(name: &str) -> Result<IpAddr, String> {
    let looking = tokio::net::lookup_host((name, 0));
    let addresses = match tokio::time::timeout(LOOKUP_TIMEOUT, looking).await {
        Ok(Ok(addresses)) => addresses,
        Ok(Err(error)) => return Err(error.to_string()),
        Err(_) => return Err(format!("no answer within {} s", LOOKUP_TIMEOUT.as_secs())),
    };
    preferred(addresses.map(|address| address.ip())).ok_or_else(|| "no address".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an IP address")
    }

    #[test]
    fn ipv4_is_preferred_when_a_name_has_both() {
        assert_eq!(
            preferred([ip("::1"), ip("127.0.0.1")]),
            Some(ip("127.0.0.1"))
        );
        assert_eq!(preferred([ip("2001:db8::1")]), Some(ip("2001:db8::1")));
        assert_eq!(preferred([]), None);
    }

    #[test]
    fn a_failure_after_a_success_keeps_the_address() {
        let mut table = Resolutions::default();
        assert!(!table.knows("db"));
        assert!(table.record("db", Ok(ip("10.0.0.1"))));
        assert!(!table.record("db", Ok(ip("10.0.0.1"))), "unchanged");
        assert!(!table.record("db", Err("timeout".into())));
        assert_eq!(table.address("db"), Some(ip("10.0.0.1")));
        assert_eq!(table.failures().count(), 0, "it resolved before");
        assert!(table.record("db", Ok(ip("10.0.0.2"))), "moved");
        assert!(!table.record("gone", Err("NXDOMAIN".into())));
        assert_eq!(table.failures().collect::<Vec<_>>(), [("gone", "NXDOMAIN")]);
        table.forget("gone");
        assert!(!table.knows("gone"));
    }

    #[test]
    fn failures_are_retried_sooner_and_sooner_less_often() {
        let now = Instant::now();
        let refresh = Duration::from_secs(30);
        let mut due = Due {
            at: now,
            failures: 0,
        };
        let mut waits = Vec::new();
        for _ in 0..7 {
            due = next_lookup(due, false, refresh, now);
            waits.push((due.at - now).as_secs());
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        let due = next_lookup(due, true, refresh, now);
        assert_eq!((due.at - now, due.failures), (refresh, 0));
    }

    #[tokio::test]
    async fn names_in_use_are_looked_up_and_dropped_when_unused() {
        let mut resolver = Resolver::new(Duration::from_secs(30));
        let now = Instant::now();
        resolver.track(vec!["localhost".into()], now);
        assert_eq!(resolver.next_due(), Some(now));
        resolver.start_due(now);
        assert_eq!(resolver.next_due(), None, "its lookup runs");
        let (name, looked_up) = resolver.finished().await;
        assert_eq!(name, "localhost");
        assert!(looked_up.expect("localhost resolves").is_loopback());
        assert!(resolver.next_due().expect("due again") > now + Duration::from_secs(29));
        resolver.track(vec![], now);
        assert_eq!(resolver.next_due(), None);
    }
}
