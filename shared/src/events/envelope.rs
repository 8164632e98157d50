//! The CloudEvents 1.0 envelope (structured JSON mode) every verimail message travels in.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::rfc3339;

/// A CloudEvents 1.0 event in structured JSON mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudEvent<T> {
    /// Always `"1.0"`.
    pub specversion: String,
    /// Unique per event; for requests, the idempotency key.
    pub id: String,
    /// Who emitted it (`/verimail/worker`, `/accounts`, ...).
    pub source: String,
    /// Event type, also the routing key.
    #[serde(rename = "type")]
    pub ty: String,
    /// When it happened.
    #[serde(
        with = "rfc3339::option",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub time: Option<OffsetDateTime>,
    /// `application/json` on every event we emit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacontenttype: Option<String>,
    /// W3C trace context, carried from a request onto its outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The typed payload.
    pub data: T,
}

impl<T: Serialize> CloudEvent<T> {
    /// A new event with a fresh UUIDv7 id, the current time and JSON content type.
    pub fn new(ty: &str, source: &str, data: T) -> Self {
        Self::with_id(uuid::Uuid::now_v7().to_string(), ty, source, data)
    }

    /// A new event with a chosen id (outcomes are re-published with the same id).
    pub fn with_id(id: String, ty: &str, source: &str, data: T) -> Self {
        Self {
            specversion: "1.0".into(),
            id,
            source: source.into(),
            ty: ty.into(),
            time: Some(OffsetDateTime::now_utc()),
            datacontenttype: Some("application/json".into()),
            traceparent: None,
            data,
        }
    }

    /// The JSON body.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Sized for a whole outcome event (a few hundred bytes, unless its
        // context is large): `to_vec` starts at 128 bytes and grew the buffer
        // twice or three times per event.
        let mut out = Vec::with_capacity(1024);
        // Serializing these types cannot fail: every map key is a string.
        match serde_json::to_writer(&mut out, self) {
            Ok(()) => out,
            Err(_) => Vec::new(),
        }
    }
}
