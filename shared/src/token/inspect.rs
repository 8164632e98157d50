//! What a token is and whether it holds, whatever format is configured:
//! [`Signer::inspect`] and the [`Inspection`] that `verimail token inspect` prints.

use serde::Serialize;
use serde_json::Value;
use time::OffsetDateTime;

use super::V1_PREFIX;
use super::claims::{ExpiredToken, TokenError};
use super::itsdangerous::{open_legacy, unsign};
use super::names::{Digest, TokenFormat};
use super::signer::Signer;

impl Signer {
    /// Says what a token is and whether it holds, whatever format is configured.
    ///
    /// `v1` tokens are checked with their own expiry; itsdangerous tokens with
    /// `ttl_seconds` as `max_age`, under both digests so the answer names the one
    /// that signed it.
    pub fn inspect(&self, token: &str, ttl_seconds: u64, now: OffsetDateTime) -> Inspection {
        if looks_like_v1(token) {
            return match self.open_v1(token) {
                Ok(claims) => Inspection {
                    status: if now < claims.expires_at {
                        InspectionStatus::Valid
                    } else {
                        InspectionStatus::Expired
                    },
                    format: Some(TokenFormat::V1),
                    digest: None,
                    issued_at: Some(claims.issued_at),
                    expires_at: Some(claims.expires_at),
                    payload: serde_json::to_value(&claims).ok(),
                    reason: None,
                },
                Err(error) => Inspection::invalid(Some(TokenFormat::V1), None, &error),
            };
        }

        let mut refusal = None;
        for digest in [self.digest(), self.digest().other()] {
            let value = match unsign(self.legacy_macs(digest), token) {
                Ok(value) => value,
                Err(error) => {
                    // A signature of the wrong length for one digest is no news when it has
                    // the right length for the other: report the more telling refusal.
                    if refusal.is_none() || error == TokenError::BadSignature {
                        refusal = Some(error);
                    }
                    continue;
                }
            };
            // The signature holds under `digest`: whatever follows is the answer.
            let with_ttl = |issued_at: OffsetDateTime| {
                i64::try_from(ttl_seconds)
                    .ok()
                    .and_then(|ttl| issued_at.checked_add(time::Duration::seconds(ttl)))
            };
            return match open_legacy(value, ttl_seconds, now) {
                Ok((payload, issued_at)) => Inspection {
                    status: InspectionStatus::Valid,
                    format: Some(TokenFormat::Itsdangerous),
                    digest: Some(digest),
                    payload: Some(payload),
                    issued_at: Some(issued_at),
                    expires_at: with_ttl(issued_at),
                    reason: None,
                },
                Err(TokenError::Expired(expired)) => {
                    let (payload, issued_at) = match *expired {
                        ExpiredToken::Itsdangerous { payload, issued_at } => {
                            (payload, Some(issued_at))
                        }
                        ExpiredToken::V1(_) => (None, None),
                    };
                    Inspection {
                        status: InspectionStatus::Expired,
                        format: Some(TokenFormat::Itsdangerous),
                        digest: Some(digest),
                        payload,
                        issued_at,
                        expires_at: issued_at.and_then(with_ttl),
                        reason: None,
                    }
                }
                Err(error) => {
                    Inspection::invalid(Some(TokenFormat::Itsdangerous), Some(digest), &error)
                }
            };
        }
        let format = looks_like_itsdangerous(token).then_some(TokenFormat::Itsdangerous);
        let error = refusal.unwrap_or(TokenError::BadSignature);
        Inspection::invalid(format, None, &error)
    }
}

/// Free-function form of [`Signer::inspect`] (what `verimail token inspect` prints).
pub fn inspect(signer: &Signer, token: &str, ttl_seconds: u64, now: OffsetDateTime) -> Inspection {
    signer.inspect(token, ttl_seconds, now)
}

/// A cheap test of the `v1.` prefix and four dot-separated parts; says nothing of validity.
pub fn looks_like_v1(token: &str) -> bool {
    token.starts_with(V1_PREFIX) && token.bytes().filter(|&b| b == b'.').count() == 3
}

/// `payload.timestamp.signature` (payload optionally `.`-prefixed), URL-safe characters only.
fn looks_like_itsdangerous(token: &str) -> bool {
    let body = token.strip_prefix('.').unwrap_or(token);
    let parts: Vec<&str> = body.split('.').collect();
    parts.len() == 3
        && !parts[0].is_empty()
        && !parts[2].is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// What `verimail token inspect` prints, as one JSON object.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Inspection {
    /// Whether the token holds now.
    pub status: InspectionStatus,
    /// The format recognised (absent when the input resembles neither).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<TokenFormat>,
    /// For itsdangerous tokens whose signature holds: the digest that signed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<Digest>,
    /// The decoded payload, only when the signature holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    /// When the token was signed (RFC 3339, UTC).
    #[serde(
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub issued_at: Option<OffsetDateTime>,
    /// When it stops being valid: `v1`'s own expiry, or itsdangerous' signing time + TTL.
    #[serde(
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub expires_at: Option<OffsetDateTime>,
    /// Why an invalid token was refused (a [`TokenError`] message).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Inspection {
    fn invalid(format: Option<TokenFormat>, digest: Option<Digest>, error: &TokenError) -> Self {
        Self {
            status: InspectionStatus::Invalid,
            format,
            digest,
            payload: None,
            issued_at: None,
            expires_at: None,
            reason: Some(error.to_string()),
        }
    }
}

/// The verdict of [`Signer::inspect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InspectionStatus {
    /// Authentic and within its lifetime.
    Valid,
    /// Authentic but too old (or, for itsdangerous, stamped in the future).
    Expired,
    /// Malformed, tampered with, or signed by a key we do not have.
    Invalid,
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::fixtures::{claims, signer};
    use time::macros::datetime;

    #[test]
    fn inspect_says_why_a_token_of_the_other_digest_fails() {
        let now = datetime!(2025-11-24 16:00:00 UTC);
        let token = signer("k", &[], "s", Digest::Sha256).mint_itsdangerous("a@b.c", now);
        let other_key = signer("other", &[], "s", Digest::Sha1);
        let inspection = other_key.inspect(&token, 60, now);
        assert_eq!(inspection.status, InspectionStatus::Invalid);
        assert_eq!(inspection.format, Some(TokenFormat::Itsdangerous));
        assert_eq!(inspection.reason.as_deref(), Some("bad signature"));
    }

    #[test]
    fn inspect_serialises_as_the_contract_says() {
        let now = datetime!(2025-11-24 16:00:00 UTC);
        let s = signer("k", &[], "email-confirm", Digest::Sha1);
        let token = s.mint_itsdangerous("a@b.c", now);
        let json = serde_json::to_value(s.inspect(&token, 3600, now)).expect("serialises");
        assert_eq!(
            json,
            serde_json::json!({
                "status": "valid",
                "format": "itsdangerous",
                "digest": "sha1",
                "payload": "a@b.c",
                "issued_at": "2025-11-24T16:00:00Z",
                "expires_at": "2025-11-24T17:00:00Z",
            })
        );
        let json = serde_json::to_value(s.inspect("nonsense", 3600, now)).expect("serialises");
        assert_eq!(json["status"], "invalid");
        assert!(json.get("payload").is_none());
    }

    #[test]
    fn looks_like_v1_wants_the_prefix_and_four_parts() {
        let s = signer("k", &[], "s", Digest::Sha1);
        assert!(looks_like_v1(&s.mint_v1(&claims())));
        assert!(!looks_like_v1("v1.a.b"));
        assert!(!looks_like_v1(
            "ImFAYi5jIg.aSSBAA.cIL0gKQnyhZASOtUkqk1fXm9Usg"
        ));
        assert!(looks_like_itsdangerous(
            "ImFAYi5jIg.aSSBAA.cIL0gKQnyhZASOtUkqk1fXm9Usg"
        ));
        assert!(looks_like_itsdangerous(".eJx.aSSBAA.cIL0"));
        assert!(!looks_like_itsdangerous("hello world"));
    }
}
