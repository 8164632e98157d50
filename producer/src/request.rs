//! [`VerificationRequest`]: what an upstream service asks for, built step by
//! step and checked with the worker's own rules before it is published.

use serde_json::{Map, Value};
use time::OffsetDateTime;
use url::Origin;
use verimail_shared::events::{
    self, DecodeError, FailureReason, Policy, Purpose, VERIFICATION_REQUESTED, ValidRequest,
};

/// A verification request, built with chained setters.
///
/// Only `user_id` and `email` are required; everything else takes the
/// contract's default (`purpose` `verify_email`, a fresh UUIDv7 event id).
///
/// ```
/// use verimail_producer::{Purpose, VerificationRequest};
///
/// let request = VerificationRequest::new("42", "alice@example.com")
///     .name("Alice")
///     .locale("zh-CN")
///     .purpose(Purpose::ResetPassword)
///     .return_url("https://app.example.com/reset")
///     .context(serde_json::json!({"signup_flow": "b"}))
///     .id("signup-42-1");
/// assert_eq!(request.event_id(), Some("signup-42-1"));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct VerificationRequest {
    id: Option<String>,
    source: Option<String>,
    traceparent: Option<String>,
    user_id: String,
    email: String,
    name: Option<String>,
    locale: Option<String>,
    purpose: Option<Purpose>,
    return_url: Option<String>,
    context: Option<Value>,
}

/// A request field that breaks one of the contract's rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {rule}")]
pub struct InvalidRequest {
    /// The field at fault, as named in the event's `data` (`email`, `return_url`)
    /// or the envelope (`id`, `source`, `traceparent`).
    pub field: &'static str,
    /// The rule it breaks, in words.
    pub rule: String,
    /// What the worker would answer: `invalid_request` or `return_url_not_allowed`.
    pub reason: FailureReason,
}

impl VerificationRequest {
    /// A request to verify `email` for `user_id` (a string of 1–128 characters;
    /// pass an integer id as its decimal form, `42.to_string()`).
    pub fn new(user_id: impl Into<String>, email: impl Into<String>) -> Self {
        Self {
            id: None,
            source: None,
            traceparent: None,
            user_id: user_id.into(),
            email: email.into(),
            name: None,
            locale: None,
            purpose: None,
            return_url: None,
            context: None,
        }
    }

    /// The name shown in the mail (at most 256 characters, always escaped).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The BCP 47 language tag of the mail and the confirmation page (`zh-CN`).
    pub fn locale(mut self, locale: impl Into<String>) -> Self {
        self.locale = Some(locale.into());
        self
    }

    /// What the link is for (default [`Purpose::VerifyEmail`]).
    pub fn purpose(mut self, purpose: Purpose) -> Self {
        self.purpose = Some(purpose);
        self
    }

    /// Where the user lands after confirming; its origin must be in the
    /// worker's `RETURN_URL_ALLOWLIST`. Required for [`Purpose::ResetPassword`].
    pub fn return_url(mut self, url: impl Into<String>) -> Self {
        self.return_url = Some(url.into());
        self
    }

    /// A JSON object (at most 4 KiB serialized) echoed on every follow-up event.
    pub fn context(mut self, context: Value) -> Self {
        self.context = Some(context);
        self
    }

    /// The CloudEvent `id` (1–128 characters), the idempotency key: publishing
    /// the same id again (a retry after a crash) never sends a second mail.
    /// Without it a fresh UUIDv7 is used.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// The same as [`VerificationRequest::id`].
    pub fn with_id(self, id: impl Into<String>) -> Self {
        self.id(id)
    }

    /// The CloudEvent `source` (default: the producer's, see
    /// [`Producer::with_source`](crate::Producer::with_source)).
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// A W3C `traceparent`, carried by the worker onto the outcome event.
    pub fn traceparent(mut self, traceparent: impl Into<String>) -> Self {
        self.traceparent = Some(traceparent.into());
        self
    }

    /// The caller-chosen event id, if any.
    pub fn event_id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// Gives the request its event id now (a fresh UUIDv7 unless one was
    /// chosen), so retries of the same request publish the same id.
    pub fn ensure_id(mut self) -> Self {
        if self.id.is_none() {
            self.id = Some(uuid::Uuid::now_v7().to_string());
        }
        self
    }

    /// The CloudEvent as JSON, `time` set to `now`.
    ///
    /// `default_source` is used unless [`VerificationRequest::source`] was set;
    /// the id is the chosen one or a fresh UUIDv7.
    pub fn to_cloudevent(&self, default_source: &str, now: OffsetDateTime) -> Value {
        let mut data = Map::new();
        data.insert("user_id".into(), Value::String(self.user_id.clone()));
        data.insert("email".into(), Value::String(self.email.clone()));
        let optional = [
            ("name", &self.name),
            ("locale", &self.locale),
            ("return_url", &self.return_url),
        ];
        for (key, value) in optional {
            if let Some(v) = value {
                data.insert(key.into(), Value::String(v.clone()));
            }
        }
        data.insert(
            "purpose".into(),
            Value::String(self.purpose.unwrap_or(Purpose::VerifyEmail).as_str().into()),
        );
        if let Some(context) = &self.context {
            data.insert("context".into(), context.clone());
        }

        let mut event = Map::new();
        event.insert("specversion".into(), "1.0".into());
        let id = self
            .id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        event.insert("id".into(), Value::String(id));
        event.insert(
            "source".into(),
            Value::String(self.source.as_deref().unwrap_or(default_source).into()),
        );
        event.insert("type".into(), VERIFICATION_REQUESTED.into());
        event.insert("time".into(), Value::String(events::rfc3339::format(now)));
        event.insert("datacontenttype".into(), "application/json".into());
        if let Some(tp) = &self.traceparent {
            event.insert("traceparent".into(), Value::String(tp.clone()));
        }
        event.insert("data".into(), Value::Object(data));
        Value::Object(event)
    }

    /// Checks the request exactly as the worker will, by decoding the event
    /// it would publish with the worker's own decoder.
    ///
    /// `allowlist`: the origins a `return_url` may point to; `None` skips that
    /// check (the producer may not know the worker's `RETURN_URL_ALLOWLIST`;
    /// the worker then answers `return_url_not_allowed` itself).
    ///
    /// ```
    /// use verimail_producer::VerificationRequest;
    ///
    /// let err = VerificationRequest::new("42", "not-an-address")
    ///     .validate(None)
    ///     .expect_err("a bad address is refused");
    /// assert_eq!(err.field, "email");
    /// ```
    pub fn validate(&self, allowlist: Option<&[Origin]>) -> Result<ValidRequest, InvalidRequest> {
        let event = self.to_cloudevent("/verimail/producer", OffsetDateTime::now_utc());
        let body = serde_json::to_vec(&event).unwrap_or_default();
        validate_body(&body, allowlist)
    }
}

/// Decodes a request body with the worker's rules; `allowlist` as in
/// [`VerificationRequest::validate`].
pub(crate) fn validate_body(
    body: &[u8],
    allowlist: Option<&[Origin]>,
) -> Result<ValidRequest, InvalidRequest> {
    // Skipping the allowlist check = allowing exactly the request's own origin.
    let own_origin: Vec<Origin>;
    let allowlist = match allowlist {
        Some(list) => list,
        None => {
            own_origin = serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|v| {
                    v.pointer("/data/return_url")
                        .and_then(Value::as_str)
                        .and_then(|u| events::parse_return_url(u).ok())
                })
                .map(|u| vec![u.origin()])
                .unwrap_or_default();
            &own_origin
        }
    };
    events::decode_request(
        body,
        Policy {
            return_url_allowlist: allowlist,
            // The worker's TOKEN_FORMAT decides this; it answers if it cannot.
            single_use_links: true,
        },
    )
    .map_err(|e| match e {
        DecodeError::Invalid { failure, .. } => InvalidRequest {
            field: failure.field,
            rule: failure.rule,
            reason: failure.reason,
        },
        // The body is JSON we built, so only the id can make it undecodable.
        DecodeError::Undecodable(why) => InvalidRequest {
            field: "id",
            rule: why.strip_prefix("id: ").unwrap_or(&why).to_owned(),
            reason: FailureReason::InvalidRequest,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn field_of(r: VerificationRequest) -> Option<&'static str> {
        r.validate(None).err().map(|e| e.field)
    }

    #[test]
    fn a_minimal_request_is_valid_and_defaults_to_verify_email() {
        let valid = VerificationRequest::new("42", "alice@example.com").validate(None);
        let valid = valid.expect("a minimal request is valid");
        assert_eq!(valid.data.purpose, Purpose::VerifyEmail);
        assert_eq!(valid.data.user_id, "42");
    }

    #[test]
    fn each_bad_field_is_named_as_the_worker_names_it() {
        let base = || VerificationRequest::new("42", "alice@example.com");
        assert_eq!(
            field_of(VerificationRequest::new("", "a@example.com")),
            Some("user_id")
        );
        assert_eq!(
            field_of(VerificationRequest::new("1", "nope")),
            Some("email")
        );
        assert_eq!(field_of(base().name("x".repeat(300))), Some("name"));
        assert_eq!(field_of(base().locale("not a tag")), Some("locale"));
        assert_eq!(field_of(base().return_url("/relative")), Some("return_url"));
        assert_eq!(field_of(base().context(json!([1]))), Some("context"));
        assert_eq!(
            field_of(base().purpose(Purpose::ResetPassword)),
            Some("return_url")
        );
        assert_eq!(field_of(base().id("")), Some("id"));
        assert_eq!(field_of(base().id("x".repeat(129))), Some("id"));
        assert_eq!(field_of(base().source("")), Some("source"));
        assert_eq!(field_of(base().traceparent("nope")), Some("traceparent"));
    }

    #[test]
    fn the_allowlist_is_checked_only_when_given() -> Result<(), url::ParseError> {
        let request = VerificationRequest::new("42", "alice@example.com")
            .return_url("https://evil.example.net/x");
        assert!(request.validate(None).is_ok());
        let allowed = vec![url::Url::parse("https://app.example.com")?.origin()];
        let err = request.validate(Some(&allowed)).err();
        assert_eq!(
            err.map(|e| (e.field, e.reason)),
            Some(("return_url", FailureReason::ReturnUrlNotAllowed))
        );
        Ok(())
    }

    #[test]
    fn the_cloudevent_carries_every_field_set() {
        let now = time::macros::datetime!(2026-11-24 10:00:00 UTC);
        let event = VerificationRequest::new("42", "alice@example.com")
            .name("Alice")
            .context(json!({"k": "v"}))
            .id("req-1")
            .to_cloudevent("/accounts", now);
        assert_eq!(
            event,
            json!({"specversion":"1.0","id":"req-1","source":"/accounts",
                   "type":"verimail.verification.requested","time":"2026-11-24T10:00:00Z",
                   "datacontenttype":"application/json",
                   "data":{"user_id":"42","email":"alice@example.com","name":"Alice",
                           "purpose":"verify_email","context":{"k":"v"}}})
        );
    }
}
