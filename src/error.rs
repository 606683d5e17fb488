//! The one error type of the HTTP surface. Each variant knows its status, its
//! OpenAI-shaped JSON body and a low-cardinality label; nothing else builds
//! error JSON.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
        code: &'static str,
    },
    #[error("Incorrect API key provided. Send `Authorization: Bearer tg-...` with a tollgate key that has not been revoked.")]
    Unauthorized,
    #[error("tollgate keys (tg-...) work only in virtual-keys mode and never leave tollgate; this server runs in passthrough mode: send your provider's own API key.")]
    TollgateKeyInPassthrough,
    #[error("`{path}` cannot be metered by tollgate yet, and team `{team}` has a budget: the request was not sent. An operator may allow it with `[auth] allow_unmetered`.")]
    EndpointNotMetered { path: String, team: String },
    #[error("The request path `{path}` has `.`/`..` segments or an encoded `/` or `\\`; send a normalised path.")]
    UnsafePath { path: String },
    #[error("The model id is {len} bytes long; the limit is {limit}.")]
    ModelTooLong { len: usize, limit: usize },
    #[error("The request body did not arrive within {timeout_ms} ms.")]
    BodyTimeout { timeout_ms: u64 },
    #[error("This key may not use the model `{model}`.")]
    ModelNotAllowed { model: String },
    #[error("{budget} has not enough budget left for this request: it may cost up to ${needed} and ${remaining} remains in the current period.")]
    BudgetExceeded {
        /// Which budget refused (`error.param`).
        level: crate::budget::Level,
        /// "Team `acme`", "Key `key_1`", "End user `alice` of team `acme`", "Tag `prod`".
        budget: String,
        needed: crate::pricing::NanoUsd,
        remaining: crate::pricing::NanoUsd,
    },
    #[error(
        "tollgate could not reach the shared budget of team `{team}` in its database; the request was not sent. Try again."
    )]
    BudgetUnavailable { team: String },
    #[error("Rate limit reached for {limited} on {unit} per min: limit {limit}. Try again in {retry_after_secs}s.")]
    RateLimited {
        /// `team` or `key` (`error.param`).
        level: crate::budget::Level,
        /// "team `acme`", "key `key_1`".
        limited: String,
        unit: crate::limits::Unit,
        limit: u64,
        retry_after_secs: u64,
    },
    #[error(
        "tollgate could not reach the shared rate limits of team `{team}` in its database; the request was not sent. Try again."
    )]
    RateUnavailable { team: String },
    #[error("Request body is larger than the limit of {limit} bytes.")]
    BodyTooLarge { limit: usize },
    #[error(
        "The model `{model}` has no price in tollgate's catalog and unpriced models are rejected."
    )]
    UnpricedModel { model: String },
    #[error("The model `{model}` has no price in tollgate's catalog, and team `{team}` has a budget: an unpriced request could pass it unseen, so it was not sent.")]
    UnpricedForBudget { model: String, team: String },
    #[error("No upstream is configured for the model `{model}`.")]
    NoUpstream { model: String },
    #[error("Unknown upstream `{name}` in x-tollgate-upstream.")]
    UnknownUpstream { name: String },
    #[error("The upstream `{upstream}` could not be reached: {reason}")]
    UpstreamUnreachable { upstream: String, reason: String },
    #[error("The upstream `{upstream}` sent a response tollgate could not read: {reason}")]
    UpstreamBadResponse { upstream: String, reason: String },
    #[error("The upstream `{upstream}` did not answer within {timeout_ms} ms.")]
    UpstreamTimeout { upstream: String, timeout_ms: u64 },
    #[error("Not found: {path}")]
    NotFound { path: String },
    #[error("Team `{team}` has a budget, and tollgate cannot bound the cost of this batch: {reason}. Upload the batch's input file through tollgate (within server.max_body_bytes), every line naming a priced model; the batch was not sent.")]
    BatchNotBounded { team: String, reason: String },
    #[error("Internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// The 429 of a reservation `over` refused.
    pub fn over_budget(over: &crate::budget::OverBudget) -> ApiError {
        use crate::budget::Level;
        let (level, name) = over.level();
        let budget = match level {
            Level::Team => format!("Team `{name}`"),
            Level::Key => format!("Key `{name}`"),
            Level::EndUser => match name.split_once(':') {
                Some((team, user)) => format!("End user `{user}` of team `{team}`"),
                None => format!("End user `{name}`"),
            },
            Level::Tag => format!("Tag `{name}`"),
        };
        ApiError::BudgetExceeded {
            level,
            budget,
            needed: over.needed,
            remaining: over.remaining,
        }
    }

    /// The 429 of a limit without room.
    pub fn rate_limited(l: &crate::limits::Limited) -> ApiError {
        let (level, name) = crate::budget::level_of(&l.account);
        ApiError::RateLimited {
            level,
            limited: format!("{} `{name}`", level.as_str()),
            unit: l.unit,
            limit: l.limit,
            retry_after_secs: l.retry_after.as_millis().div_ceil(1000).max(1) as u64,
        }
    }

    /// Seconds to wait before trying again, for `retry-after`.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            ApiError::RateLimited {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            _ => None,
        }
    }

    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> ApiError {
        ApiError::InvalidRequest {
            message: message.into(),
            param: param.map(str::to_string),
            code: "invalid_request",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest { .. }
            | ApiError::UnsafePath { .. }
            | ApiError::ModelTooLong { .. }
            | ApiError::UnpricedModel { .. }
            | ApiError::UnpricedForBudget { .. }
            | ApiError::NoUpstream { .. }
            | ApiError::UnknownUpstream { .. } => StatusCode::BAD_REQUEST,
            ApiError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unauthorized | ApiError::TollgateKeyInPassthrough => StatusCode::UNAUTHORIZED,
            ApiError::ModelNotAllowed { .. }
            | ApiError::EndpointNotMetered { .. }
            | ApiError::BatchNotBounded { .. } => StatusCode::FORBIDDEN,
            ApiError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::BudgetExceeded { .. } | ApiError::RateLimited { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::UpstreamUnreachable { .. } | ApiError::UpstreamBadResponse { .. } => {
                StatusCode::BAD_GATEWAY
            }
            ApiError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::BudgetUnavailable { .. } | ApiError::RateUnavailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// OpenAI's `error.type`.
    fn kind(&self) -> &'static str {
        match self {
            ApiError::UpstreamUnreachable { .. }
            | ApiError::UpstreamBadResponse { .. }
            | ApiError::UpstreamTimeout { .. } => "upstream_error",
            ApiError::Internal(_)
            | ApiError::BudgetUnavailable { .. }
            | ApiError::RateUnavailable { .. } => "server_error",
            // OpenAI's rate-limit errors name the unit as their type.
            ApiError::RateLimited { unit, .. } => unit.as_str(),
            ApiError::Unauthorized => "invalid_request_error",
            ApiError::ModelNotAllowed { .. }
            | ApiError::EndpointNotMetered { .. }
            | ApiError::BatchNotBounded { .. } => "permission_error",
            ApiError::BudgetExceeded { .. } => "insufficient_quota",
            _ => "invalid_request_error",
        }
    }

    /// OpenAI's `error.code`, also the metric label for tollgate's own errors.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest { code, .. } => code,
            ApiError::BodyTooLarge { .. } => "request_too_large",
            ApiError::Unauthorized | ApiError::TollgateKeyInPassthrough => "invalid_api_key",
            ApiError::EndpointNotMetered { .. } => "endpoint_not_metered",
            ApiError::UnsafePath { .. } => "invalid_path",
            ApiError::ModelTooLong { .. } => "model_too_long",
            ApiError::BodyTimeout { .. } => "request_timeout",
            ApiError::ModelNotAllowed { .. } => "model_not_allowed",
            ApiError::BudgetExceeded { .. } => "budget_exceeded",
            ApiError::UnpricedModel { .. } | ApiError::UnpricedForBudget { .. } => {
                "model_not_priced"
            }
            ApiError::NoUpstream { .. } => "model_not_found",
            ApiError::UnknownUpstream { .. } => "unknown_upstream",
            ApiError::UpstreamUnreachable { .. } => "upstream_unreachable",
            ApiError::UpstreamBadResponse { .. } => "upstream_bad_response",
            ApiError::UpstreamTimeout { .. } => "upstream_timeout",
            ApiError::NotFound { .. } => "not_found",
            ApiError::BatchNotBounded { .. } => "batch_not_bounded",
            ApiError::Internal(_) => "internal_error",
            ApiError::BudgetUnavailable { .. } => "budget_unavailable",
            ApiError::RateLimited { .. } => "rate_limit_exceeded",
            ApiError::RateUnavailable { .. } => "rate_limits_unavailable",
        }
    }

    fn param(&self) -> Option<&str> {
        match self {
            ApiError::InvalidRequest { param, .. } => param.as_deref(),
            ApiError::UnpricedModel { .. }
            | ApiError::UnpricedForBudget { .. }
            | ApiError::NoUpstream { .. }
            | ApiError::ModelTooLong { .. }
            | ApiError::ModelNotAllowed { .. } => Some("model"),
            ApiError::BudgetExceeded { level, .. } | ApiError::RateLimited { level, .. } => {
                Some(level.as_str())
            }
            _ => None,
        }
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.to_string(),
            "type": self.kind(),
            "code": self.code(),
            "param": self.param(),
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_response(self.status(), self.body().to_string())
    }
}

/// A JSON error body with its status, in whichever format's shape
/// (`format::*::render`).
pub fn json_response(status: StatusCode, body: String) -> Response {
    let mut response = (status, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_have_openai_shape() {
        let e = ApiError::BodyTooLarge { limit: 10 };
        assert_eq!(e.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let body = e.body();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "request_too_large");
        assert!(body["error"]["param"].is_null());
        assert!(body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("10 bytes"));
    }
}
