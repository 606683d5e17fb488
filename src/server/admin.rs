//! The admin API (`/admin/*`): the same operations as the CLI, as JSON.
//! Needs `Authorization: Bearer <server.admin_token>` (compared in constant
//! time); answers 404 when no admin token is configured.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::app::AppState;
use crate::auth;
use crate::budget::{Level, Period};
use crate::manage::{self, ManageError};
use crate::store::{ReportBy, StoreError};

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/admin/teams", get(list_teams).post(create_team))
        .route("/admin/teams/{name}/budget", put(set_budget))
        .route("/admin/keys", get(list_keys).post(create_key))
        .route("/admin/keys/{id}", delete(revoke_key))
        .route("/admin/budgets", get(list_level_budgets))
        .route("/admin/keys/{id}/budget", put(set_key_budget))
        .route(
            "/admin/teams/{name}/end-users/{user}/budget",
            put(set_end_user_budget),
        )
        .route("/admin/tags/{tag}/budget", put(set_tag_budget))
        .route("/admin/limits", get(list_limits))
        .route("/admin/teams/{name}/limits", put(set_team_limits))
        .route("/admin/keys/{id}/limits", put(set_key_limits))
        .route("/admin/usage", get(usage))
        // Every admin error is JSON in OpenAI's shape, axum's own included.
        .method_not_allowed_fallback(method_not_allowed)
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> AdminError {
    AdminError(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// Admin errors in OpenAI's error shape.
struct AdminError(StatusCode, &'static str, String);

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.2, "type": "invalid_request_error", "code": self.1, "param": null}});
        (
            self.0,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response()
    }
}

impl From<ManageError> for AdminError {
    fn from(e: ManageError) -> Self {
        match e {
            ManageError::Invalid(m) => AdminError(StatusCode::BAD_REQUEST, "invalid_request", m),
            ManageError::Store(s) => s.into(),
        }
    }
}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(m) => {
                AdminError(StatusCode::NOT_FOUND, "not_found", format!("{m} not found"))
            }
            StoreError::Conflict(m) => AdminError(
                StatusCode::CONFLICT,
                "already_exists",
                format!("{m} already exists"),
            ),
            other => AdminError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                other.to_string(),
            ),
        }
    }
}

fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), AdminError> {
    let Some(token) = state
        .config
        .server
        .admin_token
        .as_deref()
        .filter(|t| !t.is_empty())
    else {
        return Err(AdminError(
            StatusCode::NOT_FOUND,
            "not_found",
            "the admin API is disabled (no server.admin_token)".into(),
        ));
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(auth::bearer)
        .unwrap_or("");
    if auth::admin_token_matches(token, presented) {
        Ok(())
    } else {
        Err(AdminError(
            StatusCode::UNAUTHORIZED,
            "invalid_admin_token",
            "admin token missing or wrong".into(),
        ))
    }
}

/// USD given as a JSON number or string.
fn usd_text(v: &Value) -> Option<String> {
    match v {
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TeamBody {
    name: String,
    #[serde(default)]
    budget_usd: Option<Value>,
    #[serde(default)]
    period: Option<Period>,
    #[serde(default)]
    max_output_tokens: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BudgetBody {
    #[serde(default)]
    budget_usd: Option<Value>,
    #[serde(default)]
    period: Option<Period>,
    /// Absent: unchanged; null or 0: cleared.
    #[serde(default, with = "double_option")]
    max_output_tokens: Option<Option<u64>>,
}

mod double_option {
    use serde::{Deserialize, Deserializer};
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<u64>>, D::Error> {
        Ok(Some(Option::<u64>::deserialize(d)?))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyBody {
    team: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    models: Vec<String>,
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, AdminError> {
    serde_json::from_slice(body).map_err(|e| {
        AdminError(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("invalid JSON body: {e}"),
        )
    })
}

async fn refreshed(state: &AppState) {
    if let Err(e) = state.refresh().await {
        tracing::warn!(error = %e, "refresh after admin change failed");
    }
}

async fn list_teams(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, AdminError> {
    authorize(&state, &headers)?;
    let teams = state.store.teams().await?;
    Ok(Json(Value::Array(
        teams
            .iter()
            .map(|t| manage::team_json(t, state.ledger.status(&t.name)))
            .collect(),
    )))
}

async fn create_team(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), AdminError> {
    authorize(&state, &headers)?;
    let b: TeamBody = parse_json(&body)?;
    manage::valid_team_name(&b.name)?;
    let usd = b.budget_usd.as_ref().and_then(usd_text);
    let budget = manage::budget_from(usd.as_deref(), b.period)?;
    let team = state
        .store
        .create_team(&b.name, budget, b.max_output_tokens)
        .await?;
    refreshed(&state).await;
    Ok((
        StatusCode::CREATED,
        Json(manage::team_json(&team, state.ledger.status(&team.name))),
    ))
}

async fn set_budget(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, AdminError> {
    authorize(&state, &headers)?;
    let b: BudgetBody = parse_json(&body)?;
    let usd = b.budget_usd.as_ref().and_then(usd_text);
    let budget = manage::budget_from(usd.as_deref(), b.period)?;
    let cap = b.max_output_tokens.map(|c| c.filter(|&m| m > 0));
    let team = state.store.set_budget(&name, budget, cap).await?;
    // Applies at once: the ledger is reloaded before this answers.
    refreshed(&state).await;
    Ok(Json(manage::team_json(
        &team,
        state.ledger.status(&team.name),
    )))
}

/// Every key, end-user and tag budget with its state (SPEC 14).
async fn list_level_budgets(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, AdminError> {
    authorize(&state, &headers)?;
    let budgets = state.store.level_budgets().await?;
    Ok(Json(Value::Array(
        budgets
            .iter()
            .map(|(a, b)| manage::level_budget_json(a, *b, state.ledger.status(a)))
            .collect(),
    )))
}

async fn set_key_budget(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, AdminError> {
    set_level_budget(&state, &headers, Level::Key, None, &id, &body).await
}

async fn set_end_user_budget(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((team, user)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, AdminError> {
    set_level_budget(&state, &headers, Level::EndUser, Some(&team), &user, &body).await
}

async fn set_tag_budget(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(tag): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, AdminError> {
    set_level_budget(&state, &headers, Level::Tag, None, &tag, &body).await
}

/// Sets (`budget_usd` null or absent: clears) a key's, end user's or tag's
/// budget; applies before this answers.
async fn set_level_budget(
    state: &AppState,
    headers: &HeaderMap,
    level: Level,
    team: Option<&str>,
    name: &str,
    body: &[u8],
) -> Result<Json<Value>, AdminError> {
    authorize(state, headers)?;
    let b: BudgetBody = parse_json(body)?;
    let usd = b.budget_usd.as_ref().and_then(usd_text);
    let budget = manage::budget_from(usd.as_deref(), b.period)?;
    let account = manage::level_account(&state.store, level, team, name).await?;
    state.store.set_level_budget(&account, budget).await?;
    refreshed(state).await;
    Ok(Json(match budget {
        Some(b) => manage::level_budget_json(&account, b, state.ledger.status(&account)),
        None => json!({"level": level.as_str(), "name": name, "team": team, "budget_usd": null}),
    }))
}

#[derive(Deserialize)]
struct LimitsBody {
    #[serde(default)]
    rpm: Option<u64>,
    #[serde(default)]
    tpm: Option<u64>,
}

/// Every team's and key's rate limits, with what is left this minute.
async fn list_limits(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, AdminError> {
    authorize(&state, &headers)?;
    let limits = state.store.rate_limits().await?;
    Ok(Json(Value::Array(
        limits
            .iter()
            .map(|(a, l)| limits_json(&state, a, *l))
            .collect(),
    )))
}

fn limits_json(state: &AppState, account: &str, l: crate::period::Limits) -> Value {
    let (level, name) = crate::budget::level_of(account);
    let view = state.limits.view(&[account.to_string()]);
    json!({
        "level": level.as_str(),
        "name": name,
        "rpm": l.rpm,
        "tpm": l.tpm,
        "remaining_requests": view.and_then(|v| v.requests).map(|r| r.1),
        "remaining_tokens": view.and_then(|v| v.tokens).map(|r| r.1),
    })
}

async fn set_team_limits(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, AdminError> {
    set_limits(&state, &headers, Level::Team, &name, &body).await
}

async fn set_key_limits(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, AdminError> {
    set_limits(&state, &headers, Level::Key, &id, &body).await
}

/// Sets a team's or key's `rpm` and `tpm` (null, absent or 0: not limited);
/// applies before this answers.
async fn set_limits(
    state: &AppState,
    headers: &HeaderMap,
    level: Level,
    name: &str,
    body: &[u8],
) -> Result<Json<Value>, AdminError> {
    authorize(state, headers)?;
    let b: LimitsBody = parse_json(body)?;
    let limits = crate::period::Limits {
        rpm: b.rpm.filter(|&n| n > 0),
        tpm: b.tpm.filter(|&n| n > 0),
    };
    let account = manage::level_account(&state.store, level, None, name).await?;
    state.store.set_rate_limits(&account, limits).await?;
    refreshed(state).await;
    Ok(Json(limits_json(state, &account, limits)))
}

async fn list_keys(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, AdminError> {
    authorize(&state, &headers)?;
    let keys = state.store.keys().await?;
    Ok(Json(Value::Array(
        keys.iter().map(manage::key_json).collect(),
    )))
}

async fn create_key(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), AdminError> {
    authorize(&state, &headers)?;
    let b: KeyBody = parse_json(&body)?;
    let (row, secret) = manage::create_key(&state.store, &b.team, b.name, b.models).await?;
    refreshed(&state).await;
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": row.id, "key": secret, "team": row.team})),
    ))
}

async fn revoke_key(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, AdminError> {
    authorize(&state, &headers)?;
    state.store.revoke_key(&id).await?;
    state.directory.revoke(&id);
    Ok(Json(json!({"id": id, "revoked": true})))
}

#[derive(Deserialize)]
struct UsageQuery {
    by: Option<ReportBy>,
    since: Option<String>,
}

async fn usage(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    query: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, AdminError> {
    authorize(&state, &headers)?;
    let Query(q) = query.map_err(|e| {
        AdminError(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!(
                "{} (by=team|model|key|day, since=24h|7d|DATE)",
                e.body_text()
            ),
        )
    })?;
    let by = q.by.unwrap_or(ReportBy::Team);
    let since = manage::parse_since(q.since.as_deref().unwrap_or("30d"), chrono::Utc::now())?;
    let rows = state.store.report(by, since).await?;
    Ok(Json(manage::report_json(by, &rows)))
}
