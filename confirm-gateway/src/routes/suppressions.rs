//! `GET /v1/suppressions?email=ADDR`, `PUT /v1/suppressions/{email}` (body
//! `{"reason":"manual"}`, optional), `DELETE /v1/suppressions/{email}`: the
//! suppression list over the API, behind `GATEWAY_API_KEYS`. 200 with the
//! entry, 404 when absent, 204 on delete, 401 without a right key, 400 for a
//! malformed address or body, 503 when the database does not answer.
//!
//! PUT on an address already suppressed keeps the entry as it is (its first
//! reason, source and time) and answers it: what protects the sender is that
//! the address is on the list, and the first reason is the informative one.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::header::{CONTENT_TYPE, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use verimail_shared::events::validate_email;
use verimail_shared::suppression::{self, SuppressionReason};

use crate::AppState;
use crate::routes::codes::bearer;
use crate::routes::confirm::deadline;

/// Largest body read (`{"reason":"manual"}`).
pub const MAX_BODY: usize = 1024;

fn reply(code: StatusCode, body: Value) -> Response {
    let mut response = (code, body.to_string()).into_response();
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if code == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

fn status(code: StatusCode, status: &str) -> Response {
    reply(code, json!({"status": status}))
}

fn invalid(detail: String) -> Response {
    reply(
        StatusCode::BAD_REQUEST,
        json!({"status": "invalid", "detail": detail}),
    )
}

fn unavailable(e: &dyn std::fmt::Display) -> Response {
    tracing::warn!(error = %e, "suppression API: database unavailable");
    status(StatusCode::SERVICE_UNAVAILABLE, "unavailable")
}

fn authorized(state: &AppState, headers: &HeaderMap) -> bool {
    bearer(headers).is_some_and(|key| state.inner.api_keys.accepts(key))
}

/// The address, trimmed; else what is wrong with it.
fn checked(email: &str) -> Result<&str, String> {
    let email = email.trim();
    validate_email(email)
        .map(|()| email)
        .map_err(|p| format!("email: {p}"))
}

fn entry(s: &suppression::Suppression) -> Value {
    serde_json::to_value(s).unwrap_or(Value::Null)
}

/// `?email=`
#[derive(Debug, Deserialize)]
pub struct Lookup {
    email: Option<String>,
}

/// `GET /v1/suppressions?email=ADDR`
pub async fn lookup(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<Lookup>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if !authorized(&state, &headers) {
        return status(StatusCode::UNAUTHORIZED, "unauthorized");
    }
    let Ok(Query(Lookup { email: Some(email) })) = query else {
        return invalid("email: missing (GET /v1/suppressions?email=ADDR)".into());
    };
    let email = match checked(&email) {
        Ok(e) => e,
        Err(detail) => return invalid(detail),
    };
    match deadline(suppression::find(state.pool(), email)).await {
        Ok(Some(s)) => reply(StatusCode::OK, entry(&s)),
        Ok(None) => status(StatusCode::NOT_FOUND, "not_found"),
        Err(e) => unavailable(&e),
    }
}

/// `PUT /v1/suppressions/{email}`
pub async fn put(
    State(state): State<AppState>,
    Path(email): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if !authorized(&state, &headers) {
        return status(StatusCode::UNAUTHORIZED, "unauthorized");
    }
    let email = match checked(&email) {
        Ok(e) => e,
        Err(detail) => return invalid(detail),
    };
    let body = match body {
        Ok(b) => b,
        Err(e) => return invalid(format!("body: {e}")),
    };
    let reason = if body.iter().all(u8::is_ascii_whitespace) {
        SuppressionReason::Manual
    } else {
        match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Object(fields)) => {
                if let Some(k) = fields.keys().find(|k| k.as_str() != "reason") {
                    let shown: String = k.chars().take(32).collect();
                    return invalid(format!("unknown field `{shown}` (expected reason)"));
                }
                match fields.get("reason") {
                    None | Some(Value::Null) => SuppressionReason::Manual,
                    Some(Value::String(r)) => match r.parse() {
                        Ok(r) => r,
                        Err(p) => return invalid(format!("reason: {p}")),
                    },
                    Some(_) => return invalid("reason: must be a string".into()),
                }
            }
            Ok(_) => return invalid("body: must be a JSON object".into()),
            Err(e) => return invalid(format!("body: not JSON ({e})")),
        }
    };
    match deadline(suppression::add(state.pool(), email, reason, "api", None)).await {
        Ok((s, added)) => {
            if added {
                tracing::info!(
                    reason = reason.as_str(),
                    "address suppressed through the API"
                );
            }
            reply(StatusCode::OK, entry(&s))
        }
        Err(e) => unavailable(&e),
    }
}

/// `DELETE /v1/suppressions/{email}`
pub async fn delete(
    State(state): State<AppState>,
    Path(email): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&state, &headers) {
        return status(StatusCode::UNAUTHORIZED, "unauthorized");
    }
    let email = match checked(&email) {
        Ok(e) => e,
        Err(detail) => return invalid(detail),
    };
    match deadline(suppression::remove(state.pool(), email)).await {
        Ok(true) => {
            tracing::info!("suppression lifted through the API");
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(false) => status(StatusCode::NOT_FOUND, "not_found"),
        Err(e) => unavailable(&e),
    }
}
