//! What `/confirm` answers: the outcome [`Status`], the one mapping from status to
//! HTTP code ([`Status::http`]), the error classification ([`ConfirmError::status`])
//! and the rendering of both as a page or as JSON ([`View`]).

use axum::http::header::{CONTENT_TYPE, LOCATION, RETRY_AFTER};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use verimail_shared::telemetry::token_prefix;
use verimail_shared::token::{ExpiredToken, TokenError};

use crate::pages::Pages;
use crate::writer::WriteError;

/// The JSON `status` of a `/confirm` answer, one per row of the contract's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// First confirmation of the link.
    Verified,
    /// A `verify_email` link clicked again.
    AlreadyVerified,
    /// A single-use link opened with GET: the page shows a button that POSTs.
    ConfirmRequired,
    /// A single-use link spent already.
    Used,
    /// The link's lifetime is over.
    Expired,
    /// Malformed, tampered, signed with an unknown key, or a format not accepted.
    Invalid,
    /// Over the per-client rate limit.
    RateLimited,
    /// The database did not answer in time.
    Unavailable,
}

impl Status {
    /// Every status, for metrics registration.
    pub const ALL: [Status; 8] = [
        Status::Verified,
        Status::AlreadyVerified,
        Status::ConfirmRequired,
        Status::Used,
        Status::Expired,
        Status::Invalid,
        Status::RateLimited,
        Status::Unavailable,
    ];

    /// The wire name (`already_verified`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Verified => "verified",
            Self::AlreadyVerified => "already_verified",
            Self::ConfirmRequired => "confirm_required",
            Self::Used => "used",
            Self::Expired => "expired",
            Self::Invalid => "invalid",
            Self::RateLimited => "rate_limited",
            Self::Unavailable => "unavailable",
        }
    }

    /// The HTTP status code: the only place statuses become codes. A redirect
    /// (303) replaces the code of `verified`/`already_verified` when the
    /// `return_url` is still allowed.
    pub fn http(self) -> StatusCode {
        match self {
            Self::Verified | Self::AlreadyVerified | Self::ConfirmRequired => StatusCode::OK,
            Self::Used | Self::Expired => StatusCode::GONE,
            Self::Invalid => StatusCode::BAD_REQUEST,
            Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// Why a confirmation did not go through. Internal details are logged here,
/// never shown to the visitor.
#[derive(Debug, thiserror::Error)]
pub enum ConfirmError {
    /// Longer than any token we mint: refused before any decoding.
    #[error("token longer than {0} bytes")]
    TooLong(usize),
    /// Not a `v1` token, and itsdangerous tokens are not accepted here.
    #[error("not a v1 token (ACCEPT_ITSDANGEROUS is off)")]
    FormatNotAccepted,
    /// The token module refused it (signature, key, shape, expiry).
    #[error("token refused: {0}")]
    Token(#[from] TokenError),
    /// Authentic, but for a purpose this gateway does not know.
    #[error("unknown purpose `{0}`")]
    UnknownPurpose(String),
    /// An authentic value that breaks a rule (a legacy payload that is not an
    /// address, a control character in a claim).
    #[error("authentic token with unusable content: {0}")]
    Content(String),
    /// Over the rate limit.
    #[error("rate limited for {retry_after} s")]
    RateLimited {
        /// Whole seconds until the client may try again (≥ 1).
        retry_after: u64,
    },
    /// The database failed or refused.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Recording the confirmation (with its batch) failed.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// The database did not answer before the deadline.
    #[error("database did not answer within the deadline")]
    DatabaseTimeout,
}

impl ConfirmError {
    /// The status each failure answers with: the one classification of errors.
    pub fn status(&self) -> Status {
        match self {
            Self::Token(TokenError::Expired(_)) => Status::Expired,
            Self::TooLong(_)
            | Self::FormatNotAccepted
            | Self::Token(_)
            | Self::UnknownPurpose(_)
            | Self::Content(_) => Status::Invalid,
            Self::RateLimited { .. } => Status::RateLimited,
            // PostgreSQL refusing a value (SQLSTATE class 22, data exception) is
            // about the input, not an outage: an input never yields a 5xx.
            Self::Database(sqlx::Error::Database(e))
                if e.code().is_some_and(|c| c.starts_with("22")) =>
            {
                Status::Invalid
            }
            Self::Write(e) if e.is_data_exception() => Status::Invalid,
            Self::Database(_) | Self::Write(_) | Self::DatabaseTimeout => Status::Unavailable,
        }
    }

    /// The locale an expired `v1` token asked for (its page is still localized).
    pub fn locale(&self) -> Option<&str> {
        match self {
            Self::Token(TokenError::Expired(expired)) => match expired.as_ref() {
                ExpiredToken::V1(claims) => claims.locale.as_deref(),
                ExpiredToken::Itsdangerous { .. } => None,
            },
            _ => None,
        }
    }

    /// Logs the failure at a level matching its gravity.
    pub fn log(&self, token: &str) {
        let token = token_prefix(token);
        match self.status() {
            Status::Unavailable => tracing::warn!(%token, error = %self, "confirm unavailable"),
            Status::RateLimited => tracing::debug!(%token, error = %self, "confirm rate limited"),
            _ => tracing::info!(%token, error = %self, "confirm refused"),
        }
    }

    /// The answer shown for this failure (no user data: the page offers no secrets).
    pub fn into_reply(self) -> Reply {
        let mut reply = Reply::new(self.status());
        reply.locale = self.locale().map(str::to_owned);
        if let Self::RateLimited { retry_after } = self {
            reply.retry_after = Some(retry_after);
        }
        reply
    }
}

/// One `/confirm` answer, before rendering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The outcome.
    pub status: Status,
    /// The user, when the link named one (JSON `user_id`).
    pub user_id: Option<String>,
    /// The address, when the link named one (JSON `email`, shown on the page).
    pub email: Option<String>,
    /// Where to send the browser (303), already carrying the `verimail` parameters.
    pub redirect: Option<String>,
    /// The locale the token asked for, if any (it wins over `Accept-Language`).
    pub locale: Option<String>,
    /// `Retry-After` seconds for `rate_limited`.
    pub retry_after: Option<u64>,
    /// The link works once (`reset_password`): the button page says so.
    pub single_use: bool,
}

impl Reply {
    /// A reply with only a status.
    pub fn new(status: Status) -> Self {
        Self {
            status,
            user_id: None,
            email: None,
            redirect: None,
            single_use: false,
            locale: None,
            retry_after: None,
        }
    }

    /// The HTTP code: 303 when redirecting, else the status' own code.
    pub fn http(&self) -> StatusCode {
        if self.redirect.is_some() {
            StatusCode::SEE_OTHER
        } else {
            self.status.http()
        }
    }
}

/// How the client wants its answer: JSON or a page, in which language.
#[derive(Debug, Clone, Copy)]
pub struct View<'a> {
    /// `Accept: application/json` was sent.
    pub json: bool,
    /// The locale from `Accept-Language` (`en` when none matched).
    pub accept_locale: &'static str,
    /// The page templates.
    pub pages: &'a Pages,
}

#[derive(Serialize)]
struct JsonBody<'a> {
    status: Status,
    user_id: Option<&'a str>,
    email: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    redirect: Option<&'a str>,
}

impl View<'_> {
    /// Renders `reply` as the response.
    pub fn render(&self, reply: &Reply) -> Response {
        let code = reply.http();
        let mut response = if self.json {
            let body = JsonBody {
                status: reply.status,
                user_id: reply.user_id.as_deref(),
                email: reply.email.as_deref(),
                redirect: reply.redirect.as_deref(),
            };
            let bytes = serde_json::to_vec(&body).unwrap_or_default();
            let mut r = (code, bytes).into_response();
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        } else {
            let locale = crate::pages::locale_for(reply.locale.as_deref(), self.accept_locale);
            let html = self.pages.render(reply, locale);
            let mut r = (code, html).into_response();
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            r
        };
        if let Some(url) = &reply.redirect {
            // A `Url` serializes to ASCII only, so this always converts.
            if let Ok(value) = HeaderValue::from_str(url) {
                response.headers_mut().insert(LOCATION, value);
            }
        }
        if let Some(secs) = reply.retry_after {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_maps_to_a_4xx_or_2xx_except_unavailable() {
        for status in Status::ALL {
            let code = status.http();
            assert_eq!(
                code.is_server_error(),
                status == Status::Unavailable,
                "{status:?} → {code}"
            );
        }
    }

    #[test]
    fn the_json_names_match_the_contract() {
        let names: Vec<String> = Status::ALL
            .iter()
            .map(|s| serde_json::to_string(s).unwrap_or_default())
            .collect();
        assert_eq!(
            names,
            [
                "\"verified\"",
                "\"already_verified\"",
                "\"confirm_required\"",
                "\"used\"",
                "\"expired\"",
                "\"invalid\"",
                "\"rate_limited\"",
                "\"unavailable\""
            ]
        );
        for s in Status::ALL {
            assert_eq!(
                format!("\"{}\"", s.as_str()),
                serde_json::to_string(&s).unwrap_or_default()
            );
        }
    }

    #[test]
    fn a_pool_timeout_is_unavailable_and_a_bad_token_invalid() {
        assert_eq!(
            ConfirmError::Database(sqlx::Error::PoolTimedOut).status(),
            Status::Unavailable
        );
        assert_eq!(
            ConfirmError::Token(TokenError::BadSignature).status(),
            Status::Invalid
        );
        assert_eq!(
            ConfirmError::Token(TokenError::UnknownKey).status(),
            Status::Invalid
        );
    }
}
