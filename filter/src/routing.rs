//! Which service a request is for: routing rules tried in order, the first that matches wins,
//! then the default service. Without rules, the `Host` header (without its port) names the
//! service.
//!
//! ```json
//! "routes": [
//!   {"path_prefix": "/api/orders/", "service": "orders", "strip_prefix": true},
//!   {"header": "x-service"},
//!   {"host": "*.svc.internal"},
//!   {"host": "shop.example.com", "service": "web", "policy": "weighted_random", "retries": 1}
//! ],
//! "default_service": "web"
//! ```

use serde::Deserialize;

use crate::balancer::Policy;

/// One rule as configured.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    host: Option<String>,
    path_prefix: Option<String>,
    header: Option<String>,
    service: Option<String>,
    #[serde(default)]
    strip_prefix: bool,
    policy: Option<Policy>,
    retries: Option<usize>,
}

#[derive(Debug, Clone, PartialEq)]
enum Matcher {
    /// `*`: any host, which names the service.
    AnyHost,
    /// `*.suffix`: the part before the suffix names the service, unless the rule names one.
    HostSuffix(String),
    Host(String),
    PathPrefix {
        prefix: String,
        strip: bool,
    },
    /// The header's value names the service, unless the rule names one.
    Header(String),
}

#[derive(Debug, Clone, PartialEq)]
struct Rule {
    matcher: Matcher,
    service: Option<String>,
    policy: Option<Policy>,
    retries: Option<usize>,
}

/// Every rule, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    rules: Vec<Rule>,
    default_service: Option<String>,
}

impl Default for Rules {
    /// The `Host` header names the service.
    fn default() -> Rules {
        Rules {
            rules: vec![Rule {
                matcher: Matcher::AnyHost,
                service: None,
                policy: None,
                retries: None,
            }],
            default_service: None,
        }
    }
}

/// What a request resolved to.
#[derive(Debug, PartialEq)]
pub struct Resolved {
    pub service: String,
    /// The path to forward instead of the request's (a stripped prefix).
    pub path: Option<String>,
    pub policy: Option<Policy>,
    pub retries: Option<usize>,
}

impl Rules {
    /// Checks every rule; `Err` names the rule (by position) and what is wrong with it.
    pub fn parse(
        raw: Option<Vec<RawRule>>,
        default_service: Option<String>,
        max_retries: usize,
    ) -> Result<Rules, String> {
        if let Some(service) = &default_service {
            check_service("default_service", service)?;
        }
        let Some(raw) = raw else {
            return Ok(Rules {
                default_service,
                ..Rules::default()
            });
        };
        let mut rules = Vec::with_capacity(raw.len());
        for (at, rule) in raw.into_iter().enumerate() {
            let at = format!("routes[{at}]");
            if let Some(service) = &rule.service {
                check_service(&format!("{at}.service"), service)?;
            }
            if rule.retries.is_some_and(|retries| retries > max_retries) {
                return Err(format!("{at}.retries must be at most {max_retries}"));
            }
            if rule.strip_prefix && rule.path_prefix.is_none() {
                return Err(format!("{at}.strip_prefix needs a path_prefix"));
            }
            let matcher = match (rule.host, rule.path_prefix, rule.header) {
                (Some(host), None, None) => host_matcher(&at, &host, rule.service.is_some())?,
                (None, Some(prefix), None) => {
                    if !prefix.starts_with('/') {
                        return Err(format!("{at}.path_prefix must start with '/'"));
                    }
                    if rule.service.is_none() {
                        return Err(format!("{at} with a path_prefix must name its service"));
                    }
                    Matcher::PathPrefix {
                        prefix,
                        strip: rule.strip_prefix,
                    }
                }
                (None, None, Some(header)) if !header.is_empty() => {
                    Matcher::Header(header.to_ascii_lowercase())
                }
                _ => {
                    return Err(format!(
                        "{at} must have exactly one of host, path_prefix or a non-empty header"
                    ))
                }
            };
            rules.push(Rule {
                matcher,
                service: rule.service,
                policy: rule.policy,
                retries: rule.retries,
            });
        }
        Ok(Rules {
            rules,
            default_service,
        })
    }

    /// Whether some rule looks at the path, which is then read for every request.
    pub fn needs_path(&self) -> bool {
        self.rules
            .iter()
            .any(|rule| matches!(rule.matcher, Matcher::PathPrefix { .. }))
    }

    /// The service of a request, by the first rule that matches, or the default service.
    pub fn resolve(
        &self,
        authority: &str,
        path: Option<&str>,
        header: impl Fn(&str) -> Option<String>,
    ) -> Option<Resolved> {
        let mut host = strip_port(authority).to_ascii_lowercase();
        for rule in &self.rules {
            let (named, path) = match &rule.matcher {
                // This rule always matches and names the service: the host is not needed after.
                Matcher::AnyHost => (Some(std::mem::take(&mut host)), None),
                Matcher::HostSuffix(suffix) => match host.strip_suffix(suffix.as_str()) {
                    Some(label) if !label.is_empty() => (Some(label.to_string()), None),
                    _ => continue,
                },
                Matcher::Host(exact) if *exact == host => (None, None),
                Matcher::Host(_) => continue,
                Matcher::PathPrefix { prefix, strip } => match path {
                    Some(path) if path.starts_with(prefix.as_str()) => {
                        let rest = strip.then(|| {
                            let rest = &path[prefix.len()..];
                            if rest.starts_with('/') {
                                rest.to_string()
                            } else {
                                format!("/{rest}")
                            }
                        });
                        (None, rest)
                    }
                    _ => continue,
                },
                Matcher::Header(name) => match header(name) {
                    Some(value) if !value.is_empty() => (Some(value), None),
                    _ => continue,
                },
            };
            let Some(service) = rule.service.clone().or(named) else {
                continue;
            };
            return Some(Resolved {
                service,
                path,
                policy: rule.policy,
                retries: rule.retries,
            });
        }
        self.default_service.as_ref().map(|service| Resolved {
            service: service.clone(),
            path: None,
            policy: None,
            retries: None,
        })
    }
}

fn check_service(at: &str, service: &str) -> Result<(), String> {
    if zklb_wire::is_valid_service_name(service) {
        Ok(())
    } else {
        Err(format!(
            "{at} {service:?} is not a service name (ASCII letters, digits, '.', '_', '-')"
        ))
    }
}

fn host_matcher(at: &str, host: &str, names_service: bool) -> Result<Matcher, String> {
    let host = host.to_ascii_lowercase();
    if host == "*" {
        return Ok(Matcher::AnyHost);
    }
    if let Some(suffix) = host.strip_prefix('*') {
        if suffix.starts_with('.') && suffix.len() > 1 && !suffix.contains('*') {
            return Ok(Matcher::HostSuffix(suffix.to_string()));
        }
    } else if !host.is_empty() && !host.contains('*') {
        if !names_service {
            return Err(format!("{at} with an exact host must name its service"));
        }
        return Ok(Matcher::Host(host));
    }
    Err(format!(
        "{at}.host {host:?} must be a host name, \"*.suffix\" or \"*\""
    ))
}

/// The host of an `authority`, without its port.
fn strip_port(authority: &str) -> &str {
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            host
        }
        _ => authority,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(json: &str) -> Result<Rules, String> {
        #[derive(Deserialize)]
        struct Raw {
            routes: Option<Vec<RawRule>>,
            default_service: Option<String>,
        }
        let raw: Raw = serde_json::from_str(json).map_err(|error| error.to_string())?;
        Rules::parse(raw.routes, raw.default_service, 4)
    }

    fn service(rules: &Rules, authority: &str, path: &str, header: Option<&str>) -> Option<String> {
        rules
            .resolve(authority, Some(path), |_| header.map(str::to_string))
            .map(|resolved| resolved.service)
    }

    #[test]
    fn without_rules_the_host_names_the_service() {
        let rules = Rules::default();
        for authority in ["echo", "ECHO:10000", "Echo:80"] {
            assert_eq!(
                service(&rules, authority, "/", None).as_deref(),
                Some("echo")
            );
        }
    }

    #[test]
    fn the_first_matching_rule_wins_then_the_default() {
        let rules = rules(
            r#"{"routes": [
                {"path_prefix": "/api/orders/", "service": "orders", "strip_prefix": true},
                {"header": "x-service"},
                {"host": "*.svc.internal"},
                {"host": "shop.example.com", "service": "web", "policy": "weighted_random", "retries": 1}
            ], "default_service": "fallback"}"#,
        )
        .expect("valid");
        let resolved = rules
            .resolve("shop.example.com", Some("/api/orders/17?x=1"), |_| None)
            .expect("a service");
        assert_eq!(resolved.service, "orders");
        assert_eq!(resolved.path.as_deref(), Some("/17?x=1"));
        assert_eq!(
            service(&rules, "shop.example.com", "/", Some("billing")).as_deref(),
            Some("billing")
        );
        assert_eq!(
            service(&rules, "cart.svc.internal:8080", "/", None).as_deref(),
            Some("cart")
        );
        let web = rules
            .resolve("SHOP.example.com", Some("/"), |_| None)
            .expect("web");
        assert_eq!(
            (web.service.as_str(), web.policy, web.retries),
            ("web", Some(Policy::WeightedRandom), Some(1))
        );
        assert_eq!(
            service(&rules, "elsewhere", "/", None).as_deref(),
            Some("fallback")
        );
        assert!(rules.needs_path());
    }

    #[test]
    fn a_stripped_prefix_leaves_a_path() {
        let rules = rules(
            r#"{"routes": [{"path_prefix": "/orders", "service": "orders", "strip_prefix": true}]}"#,
        )
        .expect("valid");
        let path = |path| {
            rules
                .resolve("x", Some(path), |_| None)
                .and_then(|r| r.path)
        };
        assert_eq!(path("/orders").as_deref(), Some("/"));
        assert_eq!(path("/orders/1").as_deref(), Some("/1"));
        assert_eq!(path("/ordersx").as_deref(), Some("/x"));
        assert_eq!(rules.resolve("x", Some("/other"), |_| None), None);
    }

    #[test]
    fn bad_rules_are_refused_with_their_position() {
        let refusal = |json: &str| rules(json).expect_err(json);
        assert!(refusal(r#"{"routes": [{"host": "a", "header": "b"}]}"#)
            .contains("routes[0] must have exactly one of"));
        assert!(
            refusal(r#"{"routes": [{"header": "x"}, {"path_prefix": "/a"}]}"#)
                .contains("routes[1] with a path_prefix must name its service")
        );
        assert!(
            refusal(r#"{"routes": [{"path_prefix": "a", "service": "s"}]}"#)
                .contains("must start with '/'")
        );
        assert!(refusal(r#"{"routes": [{"host": "a.*.b"}]}"#).contains("must be a host name"));
        assert!(refusal(r#"{"routes": [{"host": "a.example"}]}"#)
            .contains("with an exact host must name its service"));
        assert!(
            refusal(r#"{"routes": [{"host": "*", "strip_prefix": true}]}"#)
                .contains("strip_prefix needs a path_prefix")
        );
        assert!(refusal(r#"{"routes": [{"host": "*", "retries": 9}]}"#)
            .contains("routes[0].retries must be at most 4"));
        assert!(refusal(r#"{"default_service": "a b"}"#).contains("is not a service name"));
        assert!(refusal(r#"{"routes": [{"hots": "*"}]}"#).contains("unknown field `hots`"));
    }

    #[test]
    fn ports_are_stripped_only_when_they_are_ports() {
        assert_eq!(strip_port("echo:8080"), "echo");
        assert_eq!(strip_port("echo"), "echo");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("::1"), "::1");
    }
}
