//! The second stage: what is asked for and where it goes. The body's facts
//! (the format's `RequestFacts`) name the model (else, Azure style, the path
//! does); the model picks the upstream; the upstream's provider names the
//! catalog model it stands for, which prices. Then the policies that need
//! the model: unpriced models, a key's model list.
//!
//! Never awaits: the catalog and the upstreams are in memory.

use http::HeaderMap;

use super::settle::{Admission, Order, Ticket};
use crate::app::AppState;
use crate::config::UnpricedPolicy;
use crate::error::ApiError;
use crate::format::request::RequestFacts;
use crate::format::WireFormat;
use crate::upstream::Upstream;

/// Names the upstream a request must go to (no fallback then).
pub const UPSTREAM_HEADER: &str = "x-tollgate-upstream";
/// The end user a request is for, over the body's `user` (SPEC 14).
pub const END_USER_HEADER: &str = "x-tollgate-end-user";
/// The request's tags, comma-separated (SPEC 14).
pub const TAGS_HEADER: &str = "x-tollgate-tags";
/// Most tags one request may carry.
const MAX_TAGS: usize = 16;

/// Where a metered request goes, and what it asked for.
pub struct Routed<'a> {
    pub upstream: &'a Upstream,
    /// The model as the upstream's path knows it: an Azure deployment's
    /// name where it differs from the catalog model.
    pub route: String,
    pub facts: RequestFacts,
}

/// Reads the request's facts and picks its upstream; the order (the model
/// as priced) goes onto the ticket.
pub fn route<'a>(
    state: &'a AppState,
    who: &Admission,
    parts: &http::request::Parts,
    body: &bytes::Bytes,
) -> Result<(Routed<'a>, Order), ApiError> {
    let path = parts.uri.path();
    // What the client asked for: the body's model, else (Azure style) the
    // deployment in the path. It routes; the catalog model it stands for
    // (an Azure deployment's model) prices.
    let path_model = who.format.path_model(path);
    let content_type = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mut facts =
        who.format
            .request_facts(who.endpoint, body, content_type, path_model.is_none())?;
    facts.stream |= who.format.path_streams(path);
    let requested = match facts.model() {
        "" => path_model
            .map(|m| m.into_owned())
            .or_else(|| who.format.default_model(who.endpoint).map(str::to_string))
            .unwrap_or_default(),
        m => m.to_string(),
    };
    let upstream = pick_upstream(state, &parts.headers, Some(&requested), who.format)?;
    let model = upstream.provider.catalog_model(&requested).to_string();
    let order = Order {
        model_label: state.metrics.model_label(&model),
        resolved: Some(state.catalog.load().resolve(&model)),
        stream: facts.stream,
        choices: facts.n.map_or(1, |n| u16::try_from(n).unwrap_or(u16::MAX)),
        end_user: parts
            .headers
            .get(END_USER_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .or(facts.end_user.as_deref())
            .map(|u| u.chars().take(256).collect()),
        tags: tags(&parts.headers)?,
        units: facts.units,
        background: facts.background,
        batch_id: None,
        model,
    };
    let routed = Routed {
        upstream,
        route: requested,
        facts,
    };
    Ok((routed, order))
}

/// `x-tollgate-tags: a,b`: sorted, distinct, each a name as a team's is.
pub fn tags(headers: &HeaderMap) -> Result<Vec<String>, ApiError> {
    let mut out: Vec<String> = Vec::new();
    for value in headers.get_all(TAGS_HEADER) {
        let bad = |reason: String| ApiError::InvalidRequest {
            code: "invalid_tags",
            message: format!("{TAGS_HEADER}: {reason}"),
            param: None,
        };
        let text = value
            .to_str()
            .map_err(|_| bad("not visible ASCII".into()))?;
        for tag in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if !crate::auth::is_valid_team_name(tag) {
                return Err(bad(format!(
                    "tag `{tag}`: use 1-64 letters, digits, '-', '_' or '.'"
                )));
            }
            out.push(tag.to_string());
        }
    }
    out.sort();
    out.dedup();
    if out.len() > MAX_TAGS {
        return Err(ApiError::InvalidRequest {
            code: "invalid_tags",
            message: format!("{TAGS_HEADER}: at most {MAX_TAGS} tags"),
            param: None,
        });
    }
    Ok(out)
}

/// The policies that need the model: `catalog.unpriced = "reject"`, a
/// budget (a guarantee: nothing it cannot price gets past it), the key's
/// model list.
pub fn check_order(state: &AppState, ticket: &Ticket) -> Result<(), ApiError> {
    let (who, order) = (&ticket.who, &ticket.order);
    let unpriced = order.resolved.as_ref().is_none_or(|r| r.price.is_none());
    if unpriced && state.config.catalog.unpriced == UnpricedPolicy::Reject {
        return Err(ApiError::UnpricedModel {
            model: order.model.clone(),
        });
    }
    if unpriced && state.ledger.has_any(&ticket.budget_accounts()) {
        return Err(ApiError::UnpricedForBudget {
            model: order.model.clone(),
            team: who.team.clone(),
        });
    }
    if let Some(key) = &who.key {
        if !key.allows(&order.model) {
            return Err(ApiError::ModelNotAllowed {
                model: order.model.clone(),
            });
        }
    }
    Ok(())
}

/// The upstream named by `x-tollgate-upstream`, else the first serving
/// `model` in `format`, else (no model) the first taking `format`.
pub fn pick_upstream<'a>(
    state: &'a AppState,
    headers: &HeaderMap,
    model: Option<&str>,
    format: WireFormat,
) -> Result<&'a Upstream, ApiError> {
    if let Some(name) = headers.get(UPSTREAM_HEADER) {
        let name = name.to_str().unwrap_or("");
        return state
            .upstreams
            .by_name(name)
            .ok_or_else(|| ApiError::UnknownUpstream {
                name: name.to_string(),
            });
    }
    match model {
        Some(model) => {
            state
                .upstreams
                .for_model(model, format)
                .ok_or_else(|| ApiError::NoUpstream {
                    model: model.to_string(),
                })
        }
        None => state
            .upstreams
            .first_for(format)
            .ok_or_else(|| format.no_upstream()),
    }
}
