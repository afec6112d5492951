//! Registry metadata that is never served: registrars put passwords, tokens and keys in instance
//! metadata (Spring Cloud copies its whole `spring.cloud.zookeeper.discovery.metadata`, Dubbo its
//! URL parameters), and the lists, the status page and Envoy's endpoint metadata are read by far
//! more people than the registry. A key is secret when it matches one of the configured
//! patterns; such keys are dropped when a znode is decoded, so no output can leak them.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// The patterns `--secret-metadata` has by default.
pub const DEFAULT_PATTERNS: &str =
    "*password*,*passwd*,*secret*,*token*,*credential*,*apikey*,*api_key*,*api-key*,*private*key*";

/// A metadata key pattern: `*` stands for any run of characters, everything else matches itself
/// without regard to case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPattern {
    /// The literal runs between the `*`s, lowercased.
    parts: Vec<String>,
    /// The pattern as written, for messages.
    written: String,
}

impl FromStr for KeyPattern {
    type Err = String;

    fn from_str(pattern: &str) -> Result<KeyPattern, String> {
        let pattern = pattern.trim();
        if pattern.is_empty() || pattern.chars().all(|character| character == '*') {
            return Err(format!(
                "'{pattern}' would hide every metadata key; name part of the key, as in *token*"
            ));
        }
        Ok(KeyPattern {
            parts: pattern.split('*').map(str::to_ascii_lowercase).collect(),
            written: pattern.to_string(),
        })
    }
}

impl fmt::Display for KeyPattern {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.written)
    }
}

impl KeyPattern {
    pub fn matches(&self, key: &str) -> bool {
        let key = key.to_ascii_lowercase();
        let (first, rest) = self.parts.split_first().expect("split yields a part");
        let Some(mut remaining) = key.strip_prefix(first.as_str()) else {
            return false;
        };
        let Some((last, middle)) = rest.split_last() else {
            // No `*`: the whole key had to be the literal.
            return remaining.is_empty();
        };
        for part in middle {
            match remaining.find(part.as_str()) {
                Some(at) => remaining = &remaining[at + part.len()..],
                None => return false,
            }
        }
        remaining.ends_with(last.as_str())
    }
}

/// The keys to hide, as configured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecretKeys(pub Vec<KeyPattern>);

impl SecretKeys {
    pub fn is_secret(&self, key: &str) -> bool {
        self.0.iter().any(|pattern| pattern.matches(key))
    }

    /// Drops the secret keys from `metadata`; returns how many there were.
    pub fn hide(&self, metadata: &mut BTreeMap<String, String>) -> usize {
        let before = metadata.len();
        metadata.retain(|key, _| !self.is_secret(key));
        before - metadata.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(patterns: &str) -> SecretKeys {
        SecretKeys(
            patterns
                .split(',')
                .map(|pattern| pattern.parse().expect("pattern"))
                .collect(),
        )
    }

    #[test]
    fn the_default_patterns_hide_what_registrars_put_in_metadata() {
        let secret = keys(DEFAULT_PATTERNS);
        for key in [
            "password",
            "db.Password",
            "spring.datasource.passwd",
            "client_secret",
            "X-Auth-Token",
            "aws_credentials",
            "apiKey",
            "tls.private-key",
        ] {
            assert!(secret.is_secret(key), "{key} is served");
        }
        for key in [
            "zone",
            "instance_status",
            "version",
            "weight",
            "keyspace",
            "side",
        ] {
            assert!(!secret.is_secret(key), "{key} is hidden");
        }
    }

    #[test]
    fn stars_stand_for_any_run_and_the_rest_must_match_in_place() {
        let pattern: KeyPattern = "db.*.pass*".parse().expect("pattern");
        assert!(pattern.matches("db.orders.password"));
        assert!(pattern.matches("DB..PASS"));
        assert!(!pattern.matches("db.orders.user"));
        assert!(!pattern.matches("x.db.orders.pass"));
        let exact: KeyPattern = "token".parse().expect("pattern");
        assert!(exact.matches("Token"));
        assert!(!exact.matches("tokens"));
        let suffix: KeyPattern = "*_pin".parse().expect("pattern");
        assert!(suffix.matches("card_pin"));
        assert!(!suffix.matches("pinned"));
    }

    #[test]
    fn a_pattern_that_would_hide_everything_is_refused() {
        for pattern in ["", "*", "**", " "] {
            let refused = pattern.parse::<KeyPattern>().expect_err(pattern);
            assert!(refused.contains("every metadata key"), "{refused}");
        }
    }

    #[test]
    fn hiding_keeps_the_other_keys() {
        let mut metadata = BTreeMap::from([
            ("zone".to_string(), "a".to_string()),
            ("token".to_string(), "t0p".to_string()),
        ]);
        assert_eq!(keys("*token*").hide(&mut metadata), 1);
        assert_eq!(metadata.keys().collect::<Vec<_>>(), ["zone"]);
    }
}
