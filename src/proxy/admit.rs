//! The first stage: who is asking. The path is checked, the caller
//! authenticated (a virtual key, or passthrough's team header) and, for a
//! path tollgate cannot price, a team with a budget refused; the body is
//! read only once a metered request is admitted.
//!
//! Never awaits the database: keys and budgets are in memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use http::{header, HeaderMap, Method};
use http_body_util::{BodyExt, Limited};

use super::settle::Admission;
use crate::app::AppState;
use crate::auth::KeyEntry;
use crate::config::AuthMode;
use crate::error::ApiError;
use crate::format::WireFormat;

const TEAM_HEADER: &str = "x-tollgate-team";

/// Who is asking, in what format, for which operation. A refusal comes
/// with the format its error is rendered in; it is not a usage row (no
/// team is known to attribute it to).
pub fn admit(
    state: &AppState,
    req: &http::Request<Body>,
    request_id: String,
) -> Result<Admission, (WireFormat, ApiError)> {
    let anthropic_configured = state.upstreams.first_for(WireFormat::Anthropic).is_some();
    let (format, endpoint) =
        WireFormat::of_request(req.uri().path(), req.headers(), anthropic_configured);
    let (team, key) = check_path(req.uri().path())
        .and_then(|()| authenticate(state, req.uri(), req.headers()))
        .map_err(|e| (format, e))?;
    Ok(Admission {
        request_id,
        started: Instant::now(),
        created_at: chrono::Utc::now(),
        format,
        endpoint,
        team,
        key,
        trace_parent: match state.config.otel.endpoint {
            Some(_) => req
                .headers()
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            None => None,
        },
    })
}

/// Refuses paths with `.`/`..` segments (raw or percent-encoded) and
/// encoded `/` or `\`: an upstream or a server behind it may normalise them
/// into a path the client was never meant to reach with tollgate's key.
fn check_path(path: &str) -> Result<(), ApiError> {
    let unsafe_path = || ApiError::UnsafePath {
        path: path.chars().take(256).collect(),
    };
    if path.contains('\\') {
        return Err(unsafe_path());
    }
    if !path.contains(['.', '%']) {
        return Ok(());
    }
    for segment in path.split('/') {
        let lower = segment.to_ascii_lowercase();
        if lower.contains("%2f") || lower.contains("%5c") {
            return Err(unsafe_path());
        }
        let dots = lower.replace("%2e", ".");
        if dots == "." || dots == ".." {
            return Err(unsafe_path());
        }
    }
    Ok(())
}

/// A team with a budget may only use paths tollgate can price, and those
/// `auth.allow_unmetered` lists: anything else would spend outside the budget.
pub fn check_unmetered_allowed(
    state: &AppState,
    who: &Admission,
    method: &Method,
    path: &str,
) -> Result<(), ApiError> {
    if state.ledger.has_budget(&who.team) && !state.auth.allows_unmetered(method, path) {
        return Err(ApiError::EndpointNotMetered {
            path: path.chars().take(256).collect(),
            team: who.team.clone(),
        });
    }
    Ok(())
}

/// The team (and key) a request is attributed to.
fn authenticate(
    state: &AppState,
    uri: &http::Uri,
    headers: &HeaderMap,
) -> Result<(String, Option<Arc<KeyEntry>>), ApiError> {
    let query_key = crate::auth::query_key(uri.query());
    match state.auth.mode() {
        AuthMode::Passthrough => {
            // A tollgate key is never forwarded: refuse rather than leak it.
            let carries_tollgate_key = crate::auth::CREDENTIAL_HEADERS.iter().any(|name| {
                headers
                    .get(*name)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(crate::auth::is_tollgate_key)
            }) || query_key.is_some_and(crate::auth::is_tollgate_key);
            if carries_tollgate_key {
                return Err(ApiError::TollgateKeyInPassthrough);
            }
            Ok((team_of(headers)?, None))
        }
        AuthMode::VirtualKeys => {
            // `Authorization: Bearer` (OpenAI SDKs), `api-key` (Azure's),
            // `x-api-key` (Anthropic's), `x-goog-api-key` or `?key=` (Gemini's).
            let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
            let secret = text("authorization")
                .and_then(crate::auth::bearer)
                .or_else(|| text("api-key"))
                .or_else(|| text("x-api-key"))
                .or_else(|| text("x-goog-api-key"))
                .or(query_key)
                .ok_or(ApiError::Unauthorized)?;
            let key = state.directory.key(secret).ok_or(ApiError::Unauthorized)?;
            Ok((key.team.clone(), Some(key)))
        }
    }
}

/// Passthrough auth: the team named by `x-tollgate-team`, else `default`.
fn team_of(headers: &HeaderMap) -> Result<String, ApiError> {
    let Some(value) = headers.get(TEAM_HEADER) else {
        return Ok("default".into());
    };
    let team = value.to_str().unwrap_or("");
    if crate::auth::is_valid_team_name(team) {
        Ok(team.to_string())
    } else {
        Err(ApiError::invalid(
            "x-tollgate-team must be 1-64 characters of letters, digits, '-', '_' or '.'",
            None,
        ))
    }
}

/// An admitted metered request's body, whole: at most
/// `server.max_body_bytes`, the client pausing at most
/// `server.body_timeout_ms`.
pub async fn read_body(
    state: &AppState,
    body: Body,
    headers: &HeaderMap,
) -> Result<Bytes, ApiError> {
    let limit = state.config.server.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::BodyTooLarge { limit });
    }
    let mut collect = std::pin::pin!(Limited::new(body, limit).collect());
    // Most bodies arrived with their headers: no timer for those.
    let collected = match futures_util::FutureExt::now_or_never(collect.as_mut()) {
        Some(collected) => collected,
        None => {
            let timeout = Duration::from_millis(state.config.server.body_timeout_ms);
            tokio::time::timeout(timeout, collect)
                .await
                .map_err(|_| ApiError::BodyTimeout {
                    timeout_ms: state.config.server.body_timeout_ms,
                })?
        }
    };
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(ApiError::BodyTooLarge { limit })
        }
        Err(e) => Err(ApiError::invalid(
            format!("Could not read the request body: {e}"),
            None,
        )),
    }
}
