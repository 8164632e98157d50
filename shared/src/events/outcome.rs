//! The events verimail emits: the three outcomes of a request (`sent`,
//! `throttled`, `failed`), the gateway's `verified`, and decoding any of them by `type`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;

use super::deliverability::{BouncedData, ComplainedData};
use super::envelope::CloudEvent;
use super::rfc3339;
use super::{
    EMAIL_BOUNCED, EMAIL_COMPLAINED, EMAIL_VERIFIED, VERIFICATION_FAILED, VERIFICATION_REQUESTED,
    VERIFICATION_SENT, VERIFICATION_THROTTLED,
};

/// Why a `failed` outcome was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureReason {
    /// A field broke a rule; `detail` names it.
    InvalidRequest,
    /// An HTTP API refused the mail for good (a 4xx other than 429); the
    /// detail has its words.
    ProviderRejected,
    /// `return_url`'s origin is not in `RETURN_URL_ALLOWLIST`.
    ReturnUrlNotAllowed,
    /// The SMTP server refused permanently (5xx).
    RecipientRejected,
    /// Transient failures lasted past `MAIL_RETRY_WINDOW_SECONDS`.
    DeliveryFailed,
    /// The address is on the suppression list; nothing was sent.
    Suppressed,
}

impl FailureReason {
    /// The wire name (`invalid_request`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::ProviderRejected => "provider_rejected",
            Self::ReturnUrlNotAllowed => "return_url_not_allowed",
            Self::RecipientRejected => "recipient_rejected",
            Self::DeliveryFailed => "delivery_failed",
            Self::Suppressed => "suppressed",
        }
    }
}

/// Fields every outcome's `data` carries (`null` when unknown).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutcomeFields {
    /// The request's CloudEvent `id`.
    pub request_id: String,
    /// `data.user_id` of the request, as a string.
    pub user_id: Option<String>,
    /// `data.email`.
    pub email: Option<String>,
    /// `data.purpose`.
    pub purpose: Option<String>,
    /// `data.context`.
    pub context: Option<Map<String, Value>>,
}

/// `data` of `verimail.verification.sent`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SentData {
    /// Echoed request fields.
    #[serde(flatten)]
    pub fields: OutcomeFields,
    /// When the SMTP server accepted the mail.
    #[serde(with = "rfc3339")]
    pub sent_at: OffsetDateTime,
    /// When the link stops working.
    #[serde(with = "rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// `data` of `verimail.verification.throttled`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThrottledData {
    /// Echoed request fields.
    #[serde(flatten)]
    pub fields: OutcomeFields,
    /// Seconds until a new request for this user and purpose would be sent (≥ 1).
    pub retry_after_seconds: u64,
}

/// `data` of `verimail.verification.failed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailedData {
    /// Echoed request fields.
    #[serde(flatten)]
    pub fields: OutcomeFields,
    /// Machine-readable reason.
    pub reason: FailureReason,
    /// Human-readable detail (names the field for `invalid_request`).
    pub detail: String,
}

/// `data` of `verimail.email.verified`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifiedData {
    /// The request whose link was confirmed (`null` for an unknown legacy token).
    pub request_id: Option<String>,
    /// The user (`null` for an unknown legacy token).
    pub user_id: Option<String>,
    /// The confirmed address.
    pub email: String,
    /// What the link was for.
    pub purpose: String,
    /// The request's context.
    pub context: Option<Map<String, Value>>,
    /// When the link was confirmed.
    #[serde(with = "rfc3339")]
    pub verified_at: OffsetDateTime,
    /// How: the link, or the code typed into the app. Events from before
    /// codes existed lack it; they were all links.
    #[serde(default)]
    pub method: VerifyMethod,
}

/// How a confirmation was made (`method` of `verimail.email.verified`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerifyMethod {
    /// The link in the mail (legacy itsdangerous links included).
    #[default]
    Link,
    /// The code in the mail, checked through `POST /v1/codes/verify`.
    Code,
}

impl VerifyMethod {
    /// The contract's spelling (`link`, `code`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Link => "link",
            Self::Code => "code",
        }
    }
}

/// Any outcome, for subscribers that decode all three.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// `verimail.verification.sent`
    Sent(CloudEvent<SentData>),
    /// `verimail.verification.throttled`
    Throttled(CloudEvent<ThrottledData>),
    /// `verimail.verification.failed`
    Failed(CloudEvent<FailedData>),
}

/// Any event verimail emits, decoded by its `type`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// An outcome of a request.
    Outcome(Outcome),
    /// A confirmed link.
    Verified(CloudEvent<VerifiedData>),
    /// A request (seen by subscribers bound to `verimail.#`).
    Requested(CloudEvent<Value>),
    /// A provider reported a bounce.
    Bounced(CloudEvent<BouncedData>),
    /// A provider reported a spam complaint.
    Complained(CloudEvent<ComplainedData>),
}

/// Decoding an emitted event failed.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// Bad JSON or a missing field.
    #[error("malformed event: {0}")]
    Json(#[from] serde_json::Error),
    /// A `type` verimail does not emit.
    #[error("unknown event type `{0}`")]
    UnknownType(String),
}

impl Event {
    /// Decodes any verimail event body by its `type`.
    pub fn decode(body: &[u8]) -> Result<Self, EventError> {
        #[derive(Deserialize)]
        struct TypeOnly {
            #[serde(rename = "type")]
            ty: String,
        }
        let TypeOnly { ty } = serde_json::from_slice(body)?;
        Ok(match ty.as_str() {
            VERIFICATION_SENT => Self::Outcome(Outcome::Sent(serde_json::from_slice(body)?)),
            VERIFICATION_THROTTLED => {
                Self::Outcome(Outcome::Throttled(serde_json::from_slice(body)?))
            }
            VERIFICATION_FAILED => Self::Outcome(Outcome::Failed(serde_json::from_slice(body)?)),
            EMAIL_VERIFIED => Self::Verified(serde_json::from_slice(body)?),
            VERIFICATION_REQUESTED => Self::Requested(serde_json::from_slice(body)?),
            EMAIL_BOUNCED => Self::Bounced(serde_json::from_slice(body)?),
            EMAIL_COMPLAINED => Self::Complained(serde_json::from_slice(body)?),
            _ => return Err(EventError::UnknownType(ty)),
        })
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_serialize_nulls_and_utc_timestamps() -> Result<(), serde_json::Error> {
        let t = time::macros::datetime!(2026-11-24 10:00:00 UTC);
        let ev = CloudEvent::with_id(
            "o-1".into(),
            VERIFICATION_THROTTLED,
            "/verimail/worker",
            ThrottledData {
                fields: OutcomeFields {
                    request_id: "r".into(),
                    user_id: None,
                    email: Some("a@example.com".into()),
                    purpose: Some("verify_email".into()),
                    context: None,
                },
                retry_after_seconds: 12,
            },
        );
        let v: Value = serde_json::from_slice(&ev.to_bytes())?;
        assert_eq!(v["data"]["user_id"], Value::Null);
        assert_eq!(v["data"]["context"], Value::Null);
        assert_eq!(v["data"]["retry_after_seconds"], 12);
        assert_eq!(rfc3339::format(t), "2026-11-24T10:00:00Z");
        assert!(matches!(
            Event::decode(&ev.to_bytes()),
            Ok(Event::Outcome(Outcome::Throttled(_)))
        ));
        Ok(())
    }
}
