//! The operator's side of the HTTP API: the status page, `/metrics`, and the one request that
//! changes state, `POST /v1/resync`. With `--admin-listen` it is served on its own address, so
//! that what Envoy and its filters reach (the lists, health, xDS) exposes none of it; requests
//! that change state need the bearer token of `--admin-token-file`, and are refused outright
//! while none is configured.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio::sync::Notify;
use zklb_wire::ErrorBody;

use crate::api::{self, AppState};

/// Requests to read every registry root again, from the API to the ingest task.
#[derive(Debug, Default)]
pub struct Resync {
    requested: Notify,
    /// Full reads done on request since start.
    pub done: AtomicU64,
}

impl Resync {
    pub fn request(&self) {
        // One stored permit: a request made while a read runs is served by the next read.
        self.requested.notify_one();
    }

    pub async fn requested(&self) {
        self.requested.notified().await;
    }

    pub fn count_done(&self) {
        self.done.fetch_add(1, Ordering::Relaxed);
    }
}

/// The bearer token that state-changing requests must carry, if any is configured.
#[derive(Clone, Default)]
pub struct AdminToken(Option<Arc<str>>);

impl AdminToken {
    /// Reads the token from `path`; surrounding whitespace (a trailing newline) is not part of it.
    pub fn load(path: Option<&std::path::Path>) -> Result<AdminToken, String> {
        let Some(path) = path else {
            return Ok(AdminToken(None));
        };
        let text = std::fs::read_to_string(path)
            .map_err(|error| format!("cannot read the admin token {}: {error}", path.display()))?;
        let token = text.trim();
        if token.len() < 16 {
            return Err(format!(
                "the admin token in {} is {} characters long; use at least 16",
                path.display(),
                token.len()
            ));
        }
        Ok(AdminToken(Some(token.into())))
    }

    /// `None` when `headers` carry the token, else the answer that refuses the request: 401
    /// (with the challenge) without the right credentials, 403 when credentials were offered
    /// to a control plane that accepts none.
    fn refusal(&self, headers: &HeaderMap) -> Option<Response> {
        let offered = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        match (&self.0, offered) {
            (Some(token), Some(offered)) if same_secret(offered.as_bytes(), token.as_bytes()) => {
                None
            }
            (None, Some(_)) => Some(refuse(
                StatusCode::FORBIDDEN,
                "requests that change state are turned off: the control plane was started \
                 without --admin-token-file",
            )),
            _ => {
                let mut answer = refuse(
                    StatusCode::UNAUTHORIZED,
                    "this request changes state and needs the admin token: \
                     Authorization: Bearer <token>",
                );
                answer.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer realm=\"zklb\""),
                );
                Some(answer)
            }
        }
    }
}

fn refuse(status: StatusCode, reason: &str) -> Response {
    let body = ErrorBody {
        error: reason.to_string(),
    };
    (status, Json(body)).into_response()
}

/// Compares in time that depends on the lengths alone, so that answers do not tell how much of
/// a guess was right.
fn same_secret(offered: &[u8], token: &[u8]) -> bool {
    offered.len() == token.len()
        && offered
            .iter()
            .zip(token)
            .fold(0u8, |differences, (a, b)| differences | (a ^ b))
            == 0
}

/// The operator's routes, without a fallback (the listener that serves them adds it).
pub fn routes(state: AppState, token: AdminToken) -> Router {
    Router::new()
        .route("/", get(api::get_status_page))
        .route("/metrics", get(api::get_metrics))
        .route(
            "/v1/resync",
            post(move |State(state): State<AppState>, headers: HeaderMap| {
                resync(token.clone(), state, headers)
            }),
        )
        .with_state(state)
}

/// Reads every registry root again now rather than when ZooKeeper next reports a change: after
/// ACLs were fixed, say, instead of waiting for the back-off on unreadable znodes.
async fn resync(token: AdminToken, state: AppState, headers: HeaderMap) -> Response {
    if let Some(refusal) = token.refusal(&headers) {
        return refusal;
    }
    state.resync.request();
    (
        StatusCode::ACCEPTED,
        Json(json!({"resync": "every registry root is read again"})),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(authorization: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            authorization.parse().expect("header"),
        );
        headers
    }

    #[test]
    fn only_the_exact_token_is_let_through() {
        let token = AdminToken(Some("0123456789abcdef".into()));
        assert!(token.refusal(&headers("Bearer 0123456789abcdef")).is_none());
        for offered in [
            "Bearer 0123456789abcdeF",
            "Bearer 0123456789abcdef0",
            "Bearer ",
            "bearer 0123456789abcdef",
            "Basic MDEyMzQ1Njc4OWFiY2RlZg==",
        ] {
            let refusal = token.refusal(&headers(offered)).expect(offered);
            assert_eq!(refusal.status(), StatusCode::UNAUTHORIZED, "{offered}");
            assert!(refusal.headers().contains_key(header::WWW_AUTHENTICATE));
        }
        let missing = token.refusal(&HeaderMap::new()).expect("no header");
        assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn without_a_token_state_changes_are_forbidden() {
        let refusal = AdminToken(None)
            .refusal(&headers("Bearer anything-at-all-here"))
            .expect("refused");
        assert_eq!(refusal.status(), StatusCode::FORBIDDEN);
        // No credentials at all: the challenge, as for a control plane that has a token.
        let refusal = AdminToken(None)
            .refusal(&HeaderMap::new())
            .expect("refused");
        assert_eq!(refusal.status(), StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn a_short_or_missing_token_file_is_refused_at_start() {
        let dir = tempfile::tempdir().expect("directory");
        let short = dir.path().join("short");
        std::fs::write(&short, "secret\n").expect("write");
        let refused = AdminToken::load(Some(&short)).err().expect("refused");
        assert!(refused.contains("at least 16"), "{refused}");
        let missing = AdminToken::load(Some(&dir.path().join("absent")))
            .err()
            .expect("refused");
        assert!(missing.contains("cannot read the admin token"), "{missing}");
        let good = dir.path().join("good");
        std::fs::write(&good, "0123456789abcdef\n").expect("write");
        let token = AdminToken::load(Some(&good)).expect("loaded");
        assert!(token.refusal(&headers("Bearer 0123456789abcdef")).is_none());
    }
}
