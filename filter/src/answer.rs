//! What the control plane answered a list poll: the changes to publish, or why the poller keeps
//! its last good list instead. Pure, so that it is unit-tested and fuzzed natively; the poller
//! counts each failure in `zklb.poll_errors.<reason>`.

use std::fmt;

use zklb_wire::ServiceChanges;

/// Why a poll gave no list to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollError {
    /// No answer: a reset, a refused connection, a local timeout, or a body above the buffer
    /// limit of Envoy's HTTP client.
    Unreachable,
    /// An answer with a status other than 200 or 304.
    Status(String),
    /// A body above the configured `max_list_bytes`, refused unread.
    TooLarge { size: usize, max: usize },
    /// A body that is not a list of changes.
    Unparsable(String),
    /// The list could not be written to shared data.
    NotStored(String),
}

impl PollError {
    /// A short, fixed name for the reason: the last part of its stat's name.
    pub fn reason(&self) -> &'static str {
        match self {
            PollError::Unreachable => "unreachable",
            PollError::Status(_) => "status",
            PollError::TooLarge { .. } => "too_large",
            PollError::Unparsable(_) => "unparsable",
            PollError::NotStored(_) => "not_stored",
        }
    }
}

impl fmt::Display for PollError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PollError::Unreachable => f.write_str("the control plane is unreachable"),
            PollError::Status(status) => write!(f, "the control plane answered {status}"),
            PollError::TooLarge { size, max } => write!(
                f,
                "the service list is {size} bytes, more than max_list_bytes ({max})"
            ),
            PollError::Unparsable(error) => write!(f, "the service list does not parse: {error}"),
            PollError::NotStored(error) => write!(f, "cannot store the service list: {error}"),
        }
    }
}

/// Refuses a body above `max` before it is read into the VM's memory.
pub fn check_size(size: usize, max: usize) -> Result<(), PollError> {
    if size > max {
        Err(PollError::TooLarge { size, max })
    } else {
        Ok(())
    }
}

/// The changes a `200` answer carries.
pub fn parse_changes(body: &[u8]) -> Result<ServiceChanges, PollError> {
    serde_json::from_slice(body).map_err(|error| PollError::Unparsable(error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_parses_and_anything_else_says_why_not() {
        let changes = parse_changes(
            br#"{"version": 7, "full": true, "services": {}, "stale": false,
                 "session": "connected"}"#,
        )
        .expect("a list");
        assert_eq!(changes.version, 7);
        for garbage in [
            &b""[..],
            b"<html>",
            b"{\"version\": \"seven\"}",
            b"\xff\xfe",
        ] {
            let error = parse_changes(garbage).expect_err("not a list");
            assert_eq!(error.reason(), "unparsable");
            assert!(error.to_string().contains("does not parse"), "{error}");
        }
    }

    #[test]
    fn a_body_above_the_maximum_is_refused() {
        assert_eq!(check_size(1024, 1024), Ok(()));
        let error = check_size(1025, 1024).expect_err("too large");
        assert_eq!(error.reason(), "too_large");
        assert_eq!(
            error.to_string(),
            "the service list is 1025 bytes, more than max_list_bytes (1024)"
        );
    }
}
