//! What a verification request is once decoded: its [`Purpose`], its
//! [`RequestData`], and, when it breaks a rule, the [`DecodeError`] that names the
//! rule and the [`Echo`] of what was valid.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use url::Url;

use super::outcome::{FailureReason, OutcomeFields};
use super::validate::truncate;

/// What a link is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    /// Confirm an address (the default): a GET confirms.
    VerifyEmail,
    /// Prove control of an address before a password reset: the link is single-use,
    /// a GET only shows a button that POSTs, and a `return_url` is required.
    ResetPassword,
}

impl Purpose {
    /// Every built-in purpose.
    pub const ALL: [Purpose; 2] = [Purpose::VerifyEmail, Purpose::ResetPassword];

    /// The wire name (`verify_email`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::VerifyEmail => "verify_email",
            Self::ResetPassword => "reset_password",
        }
    }

    /// Whether a link may be spent only once (GET shows a button, a second use is 410).
    pub fn single_use(self) -> bool {
        matches!(self, Self::ResetPassword)
    }

    /// Whether a request must carry a `return_url`.
    pub fn requires_return_url(self) -> bool {
        matches!(self, Self::ResetPassword)
    }
}

impl std::fmt::Display for Purpose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Purpose {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown purpose `{}` (expected verify_email or reset_password)",
                    truncate(s, 64)
                )
            })
    }
}

/// The `data` of a request as an upstream service sends it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestData {
    /// The user, as a string (an integer is sent as its decimal form).
    pub user_id: String,
    /// The address to verify.
    pub email: String,
    /// Shown in the mail, always escaped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// BCP 47 tag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locale: Option<String>,
    /// What the link is for.
    pub purpose: Purpose,
    /// Where the user lands after confirming.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub return_url: Option<String>,
    /// Echoed on every follow-up event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<Map<String, Value>>,
}

/// A request whose every field keeps the contract's rules.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    /// CloudEvent `id`, the idempotency key.
    pub id: String,
    /// CloudEvent `source`.
    pub source: String,
    /// Trace context to carry onto the outcome.
    pub traceparent: Option<String>,
    /// The validated data.
    pub data: RequestData,
    /// `data.return_url`, parsed.
    pub return_url: Option<Url>,
}

/// What may be checked against deployment settings while validating.
#[derive(Debug, Clone, Copy)]
pub struct Policy<'a> {
    /// Origins a `return_url` may point to.
    pub return_url_allowlist: &'a [url::Origin],
    /// Whether links can be single-use. itsdangerous tokens carry only the
    /// address, so a worker minting them cannot serve `reset_password`.
    pub single_use_links: bool,
}

/// A request the worker cannot serve as it is.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// Not a CloudEvent at all, or its id cannot be read: dead-lettered.
    #[error("undecodable: {0}")]
    Undecodable(String),
    /// A CloudEvent breaking a rule: answered with `failed`.
    #[error("{}: {}", .failure.field, .failure.rule)]
    Invalid {
        /// What the answer can echo.
        echo: Box<Echo>,
        /// The first broken rule.
        failure: RuleBroken,
    },
}

/// The first rule a request broke.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleBroken {
    /// `invalid_request` or `return_url_not_allowed`.
    pub reason: FailureReason,
    /// The field (`email`, `data`, `body`, `specversion`...).
    pub field: &'static str,
    /// The rule, in words (`more than 254 characters`).
    pub rule: String,
}

impl RuleBroken {
    /// `field: rule`, the `detail` of the failed outcome.
    pub fn detail(&self) -> String {
        format!("{}: {}", self.field, self.rule)
    }
}

/// What a request said that an outcome can echo; each `None` when it was
/// missing or broke its rule.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Echo {
    /// CloudEvent `id`.
    pub request_id: String,
    /// CloudEvent `source`, when readable.
    pub source: Option<String>,
    /// Trace context, when readable.
    pub traceparent: Option<String>,
    /// `data.user_id`.
    pub user_id: Option<String>,
    /// `data.email`.
    pub email: Option<String>,
    /// `data.purpose`.
    pub purpose: Option<Purpose>,
    /// `data.context`.
    pub context: Option<Map<String, Value>>,
}

impl Echo {
    /// The fields every outcome carries.
    pub fn outcome_fields(&self) -> OutcomeFields {
        OutcomeFields {
            request_id: self.request_id.clone(),
            user_id: self.user_id.clone(),
            email: self.email.clone(),
            purpose: self.purpose.map(|p| p.as_str().to_owned()),
            context: self.context.clone(),
        }
    }
}

impl ValidRequest {
    /// What the outcome echoes.
    pub fn echo(&self) -> Echo {
        Echo {
            request_id: self.id.clone(),
            source: Some(self.source.clone()),
            traceparent: self.traceparent.clone(),
            user_id: Some(self.data.user_id.clone()),
            email: Some(self.data.email.clone()),
            purpose: Some(self.data.purpose),
            context: self.data.context.clone(),
        }
    }
}
