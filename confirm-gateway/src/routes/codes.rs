//! `POST /v1/codes/verify`: the app's backend checks the code a user typed.
//!
//! The order of the checks is the contract's table: the caller first (rate
//! limit, then `Authorization: Bearer KEY`), then the body, then the code of
//! the latest mail sent to the user for the purpose: none (404 `no_code`),
//! dead after `CODE_MAX_ATTEMPTS` wrong tries (410 `locked`, even for the
//! right code), past `TOKEN_TTL_SECONDS` (410 `expired`), a single-use
//! purpose already confirmed (410 `used`), then the code itself: wrong (422
//! `wrong_code`, counted by one conditional UPDATE so gateways racing each
//! other never count more than the limit), right (recorded through the same
//! writer as a link click, under the same key, so a link and a code of one
//! mail confirm once and emit one event).
//!
//! The code is never logged: log lines name the user, the purpose and the
//! request id only.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::time::Instant;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;
use time::OffsetDateTime;
use verimail_shared::events::{Purpose, VerifyMethod, parse_user_id};
use verimail_shared::token::{ProofPayload, TokenFormat, code_well_formed};

use crate::AppState;
use crate::answer::ConfirmError;
use crate::client::{Decision, client_ip};
use crate::routes::confirm::{DB_DEADLINE, deadline};
use crate::store;
use crate::writer::{Confirmation, Recorded};

/// Largest body read: the three fields fit in a few hundred bytes.
pub const MAX_BODY: usize = 4096;

/// The `status` of a code check, one per row of the contract's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CodeStatus {
    /// Right code; confirmed now.
    Verified,
    /// Right code; `verify_email` was confirmed before (no second event).
    AlreadyVerified,
    /// Wrong code; `attempts_left` says how many tries remain.
    WrongCode,
    /// `CODE_MAX_ATTEMPTS` wrong tries were made: the code is dead.
    Locked,
    /// Past `TOKEN_TTL_SECONDS`.
    Expired,
    /// A single-use purpose confirmed already (by link or code).
    Used,
    /// No code was mailed to this user for this purpose.
    NoCode,
    /// No or a wrong API key.
    Unauthorized,
    /// The body is not JSON, or a field is missing or malformed.
    Invalid,
    /// Over the per-client rate limit.
    RateLimited,
    /// The database did not answer in time.
    Unavailable,
}

impl CodeStatus {
    /// The wire name (`wrong_code`), also the metric's label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Verified => "verified",
            Self::AlreadyVerified => "already_verified",
            Self::WrongCode => "wrong_code",
            Self::Locked => "locked",
            Self::Expired => "expired",
            Self::Used => "used",
            Self::NoCode => "no_code",
            Self::Unauthorized => "unauthorized",
            Self::Invalid => "invalid",
            Self::RateLimited => "rate_limited",
            Self::Unavailable => "unavailable",
        }
    }

    /// The HTTP status code: the only place code statuses become codes.
    pub fn http(self) -> StatusCode {
        match self {
            Self::Verified | Self::AlreadyVerified => StatusCode::OK,
            Self::WrongCode => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Locked | Self::Expired | Self::Used => StatusCode::GONE,
            Self::NoCode => StatusCode::NOT_FOUND,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Invalid => StatusCode::BAD_REQUEST,
            Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// One answer, before rendering. `user_id`, `email`, `purpose` and
/// `request_id` are set on 200, 422 and 410 only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CodeReply {
    /// The outcome.
    pub status: CodeStatus,
    /// The user whose code was checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// The address the mail went to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// The purpose checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub purpose: Option<&'static str>,
    /// The request whose mail carried the code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Tries left after a wrong code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts_left: Option<u32>,
    /// The PROOF, on a `reset_password` code that confirmed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proof: Option<String>,
    /// What is wrong with the body (`invalid` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// `Retry-After` seconds (`rate_limited` only; a header, not in the body).
    #[serde(skip)]
    pub retry_after: Option<u64>,
}

impl CodeReply {
    fn new(status: CodeStatus) -> Self {
        Self {
            status,
            user_id: None,
            email: None,
            purpose: None,
            request_id: None,
            attempts_left: None,
            proof: None,
            detail: None,
            retry_after: None,
        }
    }

    fn invalid(detail: impl Into<String>) -> Self {
        Self {
            detail: Some(detail.into()),
            ..Self::new(CodeStatus::Invalid)
        }
    }
}

impl IntoResponse for CodeReply {
    fn into_response(self) -> Response {
        let body = serde_json::to_string(&self).unwrap_or_else(|_| "{}".into());
        let mut response = (self.status.http(), body).into_response();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        match self.status {
            CodeStatus::Unauthorized => {
                headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            CodeStatus::RateLimited => {
                if let Some(secs) = self.retry_after {
                    headers.insert(RETRY_AFTER, HeaderValue::from(secs));
                }
            }
            _ => {}
        }
        response
    }
}

/// A well-formed body.
#[derive(Debug, PartialEq, Eq)]
struct CodeCheck {
    user_id: String,
    purpose: Purpose,
    code: String,
}

/// Reads `{"user_id": "42"|42, "purpose": "verify_email" (optional),
/// "code": "123456"}`; the error says which field is wrong and how (never
/// echoing the code).
fn parse_body(body: &[u8]) -> Result<CodeCheck, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("body: not JSON ({e})"))?;
    let Value::Object(fields) = value else {
        return Err("body: must be a JSON object".into());
    };
    if let Some(unknown) = fields
        .keys()
        .find(|k| !matches!(k.as_str(), "user_id" | "purpose" | "code"))
    {
        let shown: String = unknown.chars().take(64).collect();
        return Err(format!(
            "unknown field `{shown}` (expected user_id, purpose, code)"
        ));
    }
    let user_id = parse_user_id(fields.get("user_id")).map_err(|p| format!("user_id: {p}"))?;
    let purpose = match fields.get("purpose") {
        None | Some(Value::Null) => Purpose::VerifyEmail,
        Some(Value::String(p)) => Purpose::from_str(p).map_err(|p| format!("purpose: {p}"))?,
        Some(_) => return Err("purpose: must be a string".into()),
    };
    let code = match fields.get("code") {
        None | Some(Value::Null) => return Err("code: missing".into()),
        Some(Value::String(c)) if code_well_formed(c) => c.clone(),
        Some(Value::String(_)) => return Err("code: must be 6 to 10 digits".into()),
        Some(_) => return Err("code: must be a string of digits".into()),
    };
    Ok(CodeCheck {
        user_id,
        purpose,
        code,
    })
}

/// The token after `Bearer ` in `Authorization`, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| key.trim())
        .filter(|k| !k.is_empty())
}

/// The handler of `POST /v1/codes/verify`.
pub async fn verify(
    State(state): State<AppState>,
    headers: HeaderMap,
    // Set by `into_make_service_with_connect_info`; absent under `oneshot` tests.
    connect: Option<Extension<ConnectInfo<SocketAddr>>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let reply = decide(&state, &headers, connect, body).await;
    state.inner.metrics.code_checked(reply.status.as_str());
    reply.into_response()
}

/// Everything [`verify`] answers, before rendering.
async fn decide(
    state: &AppState,
    headers: &HeaderMap,
    connect: Option<Extension<ConnectInfo<SocketAddr>>>,
    body: Result<Bytes, BytesRejection>,
) -> CodeReply {
    let peer = connect.map_or(
        IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        |Extension(ConnectInfo(a))| a.ip(),
    );
    let client = client_ip(peer, headers, &state.inner.config.trusted_proxies);
    // The rate limit comes first: it also slows down anyone guessing keys.
    if let Decision::Limit { retry_after } = state.inner.limiter.check(client) {
        return CodeReply {
            retry_after: Some(retry_after),
            ..CodeReply::new(CodeStatus::RateLimited)
        };
    }
    if !bearer(headers).is_some_and(|key| state.inner.api_keys.accepts(key)) {
        // Debug, not info: a flood of bad keys must not flood the logs; the
        // metric counts them (`status="unauthorized"`).
        tracing::debug!("code check refused: no or wrong API key");
        return CodeReply::new(CodeStatus::Unauthorized);
    }
    let check = match body
        .map_err(|e| format!("body: {e}"))
        .and_then(|b| parse_body(&b))
    {
        Ok(check) => check,
        Err(detail) => return CodeReply::invalid(detail),
    };
    let reply = match handle(state, &check).await {
        Ok(reply) => reply,
        Err(e) => {
            let status = match e.status() {
                crate::Status::Invalid => CodeStatus::Invalid,
                _ => CodeStatus::Unavailable,
            };
            tracing::warn!(error = %e, user_id = %check.user_id, "code check failed");
            CodeReply::new(status)
        }
    };
    tracing::debug!(
        user_id = %check.user_id,
        purpose = check.purpose.as_str(),
        request_id = ?reply.request_id,
        status = reply.status.as_str(),
        "code checked"
    );
    reply
}

/// The check proper, free of HTTP details.
async fn handle(state: &AppState, check: &CodeCheck) -> Result<CodeReply, ConfirmError> {
    let config = &state.inner.config;
    let purpose = check.purpose;
    let Some(mail) = deadline(store::latest_code(
        &state.inner.pool,
        &check.user_id,
        purpose.as_str(),
    ))
    .await?
    else {
        return Ok(CodeReply::new(CodeStatus::NoCode));
    };
    let Some(code_hash) = mail.code_hash.as_deref() else {
        return Ok(CodeReply::new(CodeStatus::NoCode));
    };
    let answer = |status| CodeReply {
        user_id: Some(check.user_id.clone()),
        email: Some(mail.email.clone()),
        purpose: Some(purpose.as_str()),
        request_id: Some(mail.request_id.clone()),
        ..CodeReply::new(status)
    };
    let max = i32::try_from(config.code_max_attempts).unwrap_or(i32::MAX);
    if mail.attempts >= max {
        return Ok(answer(CodeStatus::Locked));
    }
    let now = OffsetDateTime::now_utc();
    if now >= mail.sent_at + config.token_ttl {
        return Ok(answer(CodeStatus::Expired));
    }
    if mail.confirmed && purpose.single_use() {
        return Ok(answer(CodeStatus::Used));
    }
    if !state
        .inner
        .signer
        .code_matches(&mail.request_id, &check.code, code_hash)
    {
        let counted = deadline(store::count_wrong_try(
            &state.inner.pool,
            &mail.request_id,
            code_hash,
            max,
        ))
        .await?;
        return Ok(match counted {
            Some(n) => CodeReply {
                attempts_left: Some(u32::try_from(max - n).unwrap_or(0)),
                ..answer(CodeStatus::WrongCode)
            },
            // Other tries used the last attempt meanwhile.
            None => answer(CodeStatus::Locked),
        });
    }
    if mail.confirmed {
        return Ok(answer(CodeStatus::AlreadyVerified));
    }
    // The key a link of this mail confirms under, so link and code are one
    // confirmation: `r:{request_id}` for v1 links; an itsdangerous link
    // carries only the address (`e:{email}`).
    let key = if config.token_format == TokenFormat::Itsdangerous && !purpose.single_use() {
        format!("e:{}", mail.email)
    } else {
        format!("r:{}", mail.request_id)
    };
    let confirmation = Confirmation {
        key,
        request_id: Some(mail.request_id.clone()),
        user_id: Some(check.user_id.clone()),
        email: mail.email.clone(),
        purpose,
        legacy: false,
        at: now,
        method: VerifyMethod::Code,
    };
    let Recorded { first, .. } = state
        .inner
        .writer
        .record_within(confirmation, Instant::now() + DB_DEADLINE)
        .await?;
    if !first {
        // A link click (or another check) of this mail confirmed it first.
        return Ok(answer(if purpose.single_use() {
            CodeStatus::Used
        } else {
            CodeStatus::AlreadyVerified
        }));
    }
    let mut reply = answer(CodeStatus::Verified);
    if purpose.single_use() {
        reply.proof = Some(state.inner.signer.mint_proof(
            &ProofPayload {
                request_id: Some(mail.request_id.clone()),
                user_id: Some(check.user_id.clone()),
                email: mail.email.clone(),
                purpose: purpose.as_str().to_owned(),
            },
            now,
        ));
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_good_body_parses_with_a_string_or_integer_user() {
        let check = parse_body(br#"{"user_id": 42, "code": "012345"}"#);
        assert_eq!(
            check,
            Ok(CodeCheck {
                user_id: "42".into(),
                purpose: Purpose::VerifyEmail,
                code: "012345".into()
            })
        );
        let check =
            parse_body(br#"{"user_id": "u-1", "purpose": "reset_password", "code": "0123456789"}"#);
        assert!(matches!(check, Ok(c) if c.purpose == Purpose::ResetPassword));
    }

    #[test]
    fn each_bad_body_names_what_is_wrong_without_echoing_the_code() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "body: not JSON"),
            (b"[1]", "body: must be a JSON object"),
            (br#"{"code": "123456"}"#, "user_id: missing"),
            (br#"{"user_id": "", "code": "123456"}"#, "user_id: empty"),
            (
                br#"{"user_id": 4.5, "code": "123456"}"#,
                "user_id: a number",
            ),
            (br#"{"user_id": "1"}"#, "code: missing"),
            (
                br#"{"user_id": "1", "code": 123456}"#,
                "code: must be a string",
            ),
            (
                br#"{"user_id": "1", "code": "12345"}"#,
                "code: must be 6 to 10 digits",
            ),
            (
                br#"{"user_id": "1", "code": "12345x"}"#,
                "code: must be 6 to 10 digits",
            ),
            (
                br#"{"user_id": "1", "code": "123456", "purpose": "welcome"}"#,
                "purpose: unknown purpose",
            ),
            (
                br#"{"user_id": "1", "code": "123456", "purpose": 1}"#,
                "purpose: must be a string",
            ),
            (
                br#"{"user_id": "1", "code": "123456", "purpsoe": "x"}"#,
                "unknown field `purpsoe`",
            ),
        ];
        for (body, expected) in cases {
            let err = parse_body(body).err().unwrap_or_default();
            assert!(
                err.starts_with(expected),
                "{}: {err}",
                String::from_utf8_lossy(body)
            );
            assert!(!err.contains("12345"), "{err}");
        }
    }

    #[test]
    fn only_a_bearer_authorization_names_a_key() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer(&headers), None);
        for (value, key) in [
            ("Bearer abc", Some("abc")),
            ("bearer  abc ", Some("abc")),
            ("Basic abc", None),
            ("Bearer ", None),
            ("Bearerabc", None),
        ] {
            headers.insert(AUTHORIZATION, HeaderValue::from_static(value));
            assert_eq!(bearer(&headers), key, "{value}");
        }
    }

    #[test]
    fn every_status_has_the_contracts_code() {
        use CodeStatus::*;
        let codes = [
            (Verified, 200),
            (AlreadyVerified, 200),
            (WrongCode, 422),
            (Locked, 410),
            (Expired, 410),
            (Used, 410),
            (NoCode, 404),
            (Unauthorized, 401),
            (Invalid, 400),
            (RateLimited, 429),
            (Unavailable, 503),
        ];
        for (status, code) in codes {
            assert_eq!(status.http().as_u16(), code, "{status:?}");
        }
        let body = serde_json::to_value(CodeReply::new(AlreadyVerified)).unwrap_or_default();
        assert_eq!(body, serde_json::json!({"status": "already_verified"}));
    }
}
