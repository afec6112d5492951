//! One check of an instance: an HTTP request whose status must be one of those expected, or a
//! TCP connection that must be accepted.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use thiserror::Error;

/// What a check does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// `GET <path>` on the instance's address and port, on a new connection each time.
    Http { path: String, expect: Statuses },
    /// A TCP connection to the instance's address and port.
    Tcp,
}

/// HTTP statuses that pass a check, as `200-299,404`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statuses(Vec<(u16, u16)>);

impl Statuses {
    pub fn contains(&self, status: u16) -> bool {
        self.0
            .iter()
            .any(|&(low, high)| (low..=high).contains(&status))
    }
}

impl Default for Statuses {
    /// Success and redirection, as HAProxy's HTTP checks count them.
    fn default() -> Statuses {
        Statuses(vec![(200, 399)])
    }
}

impl FromStr for Statuses {
    type Err = String;

    fn from_str(text: &str) -> Result<Statuses, String> {
        let status = |part: &str| -> Result<u16, String> {
            part.trim()
                .parse::<u16>()
                .ok()
                .filter(|status| (100..=599).contains(status))
                .ok_or_else(|| format!("{part:?} is not an HTTP status (100 to 599)"))
        };
        let ranges = text
            .split(',')
            .map(|part| match part.split_once('-') {
                Some((low, high)) => {
                    let (low, high) = (status(low)?, status(high)?);
                    if low <= high {
                        Ok((low, high))
                    } else {
                        Err(format!("{part:?} is an empty range"))
                    }
                }
                None => status(part).map(|status| (status, status)),
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Statuses(ranges))
    }
}

impl fmt::Display for Statuses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|&(low, high)| {
                if low == high {
                    low.to_string()
                } else {
                    format!("{low}-{high}")
                }
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

#[derive(Debug, Error)]
pub enum ProbeError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("HTTP request failed: {0}")]
    Http(reqwest::Error),
    #[error("answered {status}, expected {expected}")]
    Status { status: u16, expected: Statuses },
}

/// Runs one instance's probe.
pub struct Prober {
    probe: Probe,
    target: SocketAddr,
    http: reqwest::Client,
}

impl Prober {
    pub fn new(probe: Probe, target: SocketAddr) -> Prober {
        let http = reqwest::Client::builder()
            // Each check opens its own connection, so that one that is no longer accepted fails.
            .pool_max_idle_per_host(0)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("an HTTP client without TLS always builds");
        Prober {
            probe,
            target,
            http,
        }
    }

    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// One check, without a deadline of its own (the caller has one).
    pub async fn check(&self) -> Result<(), ProbeError> {
        match &self.probe {
            Probe::Tcp => tokio::net::TcpStream::connect(self.target)
                .await
                .map(drop)
                .map_err(ProbeError::Connect),
            Probe::Http { path, expect } => {
                let status = self
                    .http
                    .get(format!("http://{}{path}", self.target))
                    .send()
                    .await
                    .map_err(ProbeError::Http)?
                    .status()
                    .as_u16();
                if expect.contains(status) {
                    Ok(())
                } else {
                    Err(ProbeError::Status {
                        status,
                        expected: expect.clone(),
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_codes_and_ranges() {
        let statuses: Statuses = "200-299, 404".parse().expect("valid");
        assert!(statuses.contains(200) && statuses.contains(299) && statuses.contains(404));
        assert!(!statuses.contains(300) && !statuses.contains(403) && !statuses.contains(503));
        assert_eq!(statuses.to_string(), "200-299,404");
        assert!(Statuses::default().contains(302));
        assert!(!Statuses::default().contains(404));
    }

    #[test]
    fn bad_statuses_are_named() {
        let error = |text: &str| text.parse::<Statuses>().expect_err(text);
        assert!(error("2xx").contains("\"2xx\" is not an HTTP status"));
        assert!(error("200-99").contains("\"99\" is not an HTTP status"));
        assert!(error("299-200").contains("\"299-200\" is an empty range"));
        assert!(error("").contains("is not an HTTP status"));
    }

    #[tokio::test]
    async fn a_tcp_probe_passes_while_something_listens() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding");
        let target = listener.local_addr().expect("address");
        let prober = Prober::new(Probe::Tcp, target);
        assert!(prober.check().await.is_ok());
        drop(listener);
        assert!(matches!(prober.check().await, Err(ProbeError::Connect(_))));
    }

    #[tokio::test]
    async fn an_http_probe_passes_on_an_expected_status_only() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding");
        let target = listener.local_addr().expect("address");
        let app = axum::Router::new()
            .route("/ok", axum::routing::get(|| async { "ok" }))
            .route(
                "/sick",
                axum::routing::get(|| async { axum::http::StatusCode::SERVICE_UNAVAILABLE }),
            );
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let probe = |path: &str| Probe::Http {
            path: path.to_string(),
            expect: Statuses::default(),
        };
        assert!(Prober::new(probe("/ok"), target).check().await.is_ok());
        let sick = Prober::new(probe("/sick"), target).check().await;
        assert!(
            matches!(sick, Err(ProbeError::Status { status: 503, .. })),
            "{sick:?}"
        );
        server.abort();
    }
}
