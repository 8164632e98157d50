//! `POST /v1/webhooks/{provider}`: the providers' bounce and complaint
//! notifications (see [`crate::webhooks`]). Answers: 200 for every
//! authentic notification (acted on or not, so the provider stops
//! retrying), 401 when authentication fails, 400 for a body the provider
//! would not send, 404 for a provider not in `WEBHOOK_SECRETS`, 503 when the
//! database is unavailable (the provider retries). Never 500.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::AppState;
use crate::webhooks::{self, Outcome};

/// The handler.
pub async fn receive(
    State(state): State<AppState>,
    Path(provider): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let outcome = match body {
        Ok(body) => webhooks::handle(&state, &provider, &headers, &body).await,
        Err(e) => Outcome::Invalid(format!("body: {e}")),
    };
    // Only known provider names become labels (the path is the caller's).
    let label: &'static str = match provider.as_str() {
        "mailgun" => "mailgun",
        "sendgrid" => "sendgrid",
        "postmark" => "postmark",
        "ses" => "ses",
        _ => "unknown",
    };
    let metrics = state.metrics();
    let (code, body) = match &outcome {
        Outcome::Done {
            acted,
            duplicates,
            ignored,
        } => {
            metrics.webhook(label, "acted", *acted as u64);
            metrics.webhook(label, "duplicate", *duplicates as u64);
            metrics.webhook(label, "ignored", *ignored as u64);
            (
                StatusCode::OK,
                json!({"status": "ok", "acted": acted, "duplicates": duplicates, "ignored": ignored}),
            )
        }
        Outcome::Confirmed => {
            metrics.webhook(label, "confirmed", 1);
            (StatusCode::OK, json!({"status": "subscription_confirmed"}))
        }
        Outcome::Unauthorized => {
            metrics.webhook(label, "unauthorized", 1);
            tracing::debug!(provider = label, "webhook refused: authentication failed");
            (StatusCode::UNAUTHORIZED, json!({"status": "unauthorized"}))
        }
        Outcome::Invalid(detail) => {
            metrics.webhook(label, "invalid", 1);
            (
                StatusCode::BAD_REQUEST,
                json!({"status": "invalid", "detail": detail}),
            )
        }
        Outcome::NotFound => {
            metrics.webhook(label, "not_found", 1);
            (StatusCode::NOT_FOUND, json!({"status": "not_found"}))
        }
        Outcome::Unavailable => {
            metrics.webhook(label, "unavailable", 1);
            (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"status": "unavailable"}),
            )
        }
    };
    let mut response = (code, body.to_string()).into_response();
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
