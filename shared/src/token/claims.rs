//! What tokens carry ([`Claims`], [`LegacyClaims`], the PROOF's [`ProofPayload`])
//! and why one is refused ([`TokenError`], [`Malformation`]).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

use super::pyjson::py_json_str;
use super::{MAX_DECOMPRESSED_LEN, MAX_TOKEN_LEN};

/// What a `v1` token carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The request's CloudEvent `id`.
    pub request_id: String,
    /// The user, as a string.
    pub user_id: String,
    /// The address being verified.
    pub email: String,
    /// What the link is for (`verify_email`, `reset_password`).
    pub purpose: String,
    /// The locale the confirmation page is shown in.
    pub locale: Option<String>,
    /// When the token was minted (whole seconds).
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
    /// The first instant the token is refused (whole seconds).
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// What an itsdangerous token carries.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LegacyClaims {
    /// The signed JSON value (for links minted by a Flask app: the email).
    pub payload: Value,
    /// The payload when it is a JSON string, as the legacy pattern signs the email alone.
    pub email: Option<String>,
    /// When the token was signed.
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
}

impl LegacyClaims {
    pub(super) fn new(payload: Value, issued_at: OffsetDateTime) -> Self {
        let email = payload.as_str().map(str::to_owned);
        Self {
            payload,
            email,
            issued_at,
        }
    }
}

/// The PROOF's payload, serialized as `{"request_id":…,"user_id":…,"email":…,"purpose":…}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProofPayload {
    /// The request's CloudEvent `id`, `null` when unknown (legacy tokens).
    pub request_id: Option<String>,
    /// The user, `null` when unknown (legacy tokens).
    pub user_id: Option<String>,
    /// The confirmed address.
    pub email: String,
    /// The purpose that was confirmed.
    pub purpose: String,
}

impl ProofPayload {
    /// Exactly Python's `json.dumps(dict, ensure_ascii=False, separators=(",", ":"))`
    /// of the dict in the contract's key order.
    pub(super) fn to_python_json(&self) -> String {
        let mut out = String::with_capacity(96 + self.email.len());
        let opt = |value: &Option<String>, out: &mut String| match value {
            Some(s) => py_json_str(s, out),
            None => out.push_str("null"),
        };
        out.push_str("{\"request_id\":");
        opt(&self.request_id, &mut out);
        out.push_str(",\"user_id\":");
        opt(&self.user_id, &mut out);
        out.push_str(",\"email\":");
        py_json_str(&self.email, &mut out);
        out.push_str(",\"purpose\":");
        py_json_str(&self.purpose, &mut out);
        out.push('}');
        out
    }
}

/// Why a token was refused. Never carries secret material.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TokenError {
    /// Not a well-formed token (see [`Malformation`]).
    #[error("malformed token: {0}")]
    Malformed(Malformation),
    /// Well-formed, but no configured key produced its signature.
    #[error("bad signature")]
    BadSignature,
    /// A `v1` token whose key id names none of the configured keys.
    #[error("signed with an unknown key")]
    UnknownKey,
    /// Authentic but expired; carries what was decoded.
    #[error("token expired")]
    Expired(Box<ExpiredToken>),
    /// Authentic, but minted for another purpose.
    #[error("token is for another purpose")]
    WrongPurpose,
}

impl From<Malformation> for TokenError {
    fn from(what: Malformation) -> Self {
        Self::Malformed(what)
    }
}

/// What an authentic but expired token contained.
#[derive(Debug, Clone, PartialEq)]
pub enum ExpiredToken {
    /// A `v1` token's claims.
    V1(Claims),
    /// An itsdangerous token's payload (`None` if it does not decode) and signing time.
    Itsdangerous {
        /// The signed JSON value.
        payload: Option<Value>,
        /// When it was signed.
        issued_at: OffsetDateTime,
    },
}

/// Which part of a token is malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformation {
    /// Longer than [`MAX_TOKEN_LEN`].
    #[error("longer than {MAX_TOKEN_LEN} bytes")]
    TooLong,
    /// Not the expected dot-separated parts.
    #[error("not made of the expected parts")]
    Structure,
    /// The signature is not canonical base64url of the digest's length.
    #[error("signature is not canonical base64url of the right length")]
    Signature,
    /// The `v1` payload or the itsdangerous base64 does not decode.
    #[error("payload does not decode")]
    Payload,
    /// The timestamp does not decode or lies outside 1970..=9999.
    #[error("timestamp does not decode or is out of range")]
    Timestamp,
    /// The compressed payload is not a valid zlib stream.
    #[error("compressed payload is corrupt")]
    Compression,
    /// The compressed payload inflates beyond [`MAX_DECOMPRESSED_LEN`].
    #[error("payload inflates beyond {MAX_DECOMPRESSED_LEN} bytes")]
    TooLarge,
    /// The payload is not JSON.
    #[error("payload is not JSON")]
    Json,
    /// The JSON payload lacks the expected fields.
    #[error("payload lacks the expected fields")]
    Claims,
}

pub(super) fn check_v1_expiry(claims: Claims, now: OffsetDateTime) -> Result<Claims, TokenError> {
    if now >= claims.expires_at {
        return Err(TokenError::Expired(Box::new(ExpiredToken::V1(claims))));
    }
    Ok(claims)
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proof_payload_keeps_the_contract_key_order() {
        let proof = ProofPayload {
            request_id: None,
            user_id: Some("42".into()),
            email: "a@b.c".into(),
            purpose: "reset_password".into(),
        };
        assert_eq!(
            proof.to_python_json(),
            r#"{"request_id":null,"user_id":"42","email":"a@b.c","purpose":"reset_password"}"#
        );
    }
}
