//! Turning znodes into normalized instances, one submodule per registry format.

pub mod curator;

use thiserror::Error;

/// Why a znode could not be read as an instance. The caller names the znode.
#[derive(Debug, Error)]
pub enum DecodeError {
    #[error("not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("missing field `{0}`")]
    Missing(&'static str),
    #[error("field `{field}` is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
}
