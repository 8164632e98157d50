//! CloudEvents 1.0 (structured JSON mode) envelopes and the typed `data` of
//! the five verimail event types.
//!
//! Decoding a request is strict and explains itself: a body that is not a
//! CloudEvent is [`DecodeError::Undecodable`] (nobody to answer, so it is
//! dead-lettered); a CloudEvent whose data breaks a rule is
//! [`DecodeError::Invalid`], which names the field and the rule and carries
//! what *was* valid so the `failed` outcome can echo it.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;
use url::Url;

/// `type` of a verification request (also its routing key).
pub const VERIFICATION_REQUESTED: &str = "verimail.verification.requested";
/// `type` of the outcome: the SMTP server accepted the mail.
pub const VERIFICATION_SENT: &str = "verimail.verification.sent";
/// `type` of the outcome: a mail went out too recently.
pub const VERIFICATION_THROTTLED: &str = "verimail.verification.throttled";
/// `type` of the outcome: the request could not be served.
pub const VERIFICATION_FAILED: &str = "verimail.verification.failed";
/// `type` of the gateway's event: a link was confirmed.
pub const EMAIL_VERIFIED: &str = "verimail.email.verified";
/// AMQP `content_type` of every message.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";
/// A request body larger than this is refused (`invalid_request`, field `body`).
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Bodies larger than this are not even parsed for their id.
const MAX_PARSED_BODY_BYTES: usize = 1024 * 1024;
/// Largest serialized `context`.
pub const MAX_CONTEXT_BYTES: usize = 4 * 1024;

/// RFC 3339 timestamps in UTC, as every event field carries them.
pub mod rfc3339 {
    use serde::{Deserialize, Deserializer, Serializer};
    use time::OffsetDateTime;
    use time::format_description::well_known::Rfc3339;

    /// Formats `t` in UTC (`2026-11-24T10:00:00Z`).
    pub fn format(t: OffsetDateTime) -> String {
        t.to_offset(time::UtcOffset::UTC)
            .format(&Rfc3339)
            .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
    }

    /// Serde `serialize_with` for [`OffsetDateTime`].
    pub fn serialize<S: Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*t))
    }

    /// Serde `deserialize_with` for [`OffsetDateTime`].
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<OffsetDateTime, D::Error> {
        let s = String::deserialize(d)?;
        OffsetDateTime::parse(&s, &Rfc3339).map_err(serde::de::Error::custom)
    }

    /// The same for `Option<OffsetDateTime>`.
    pub mod option {
        use super::*;

        /// Serde `serialize_with` for `Option<OffsetDateTime>`.
        pub fn serialize<S: Serializer>(
            t: &Option<OffsetDateTime>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match t {
                Some(t) => s.serialize_str(&format(*t)),
                None => s.serialize_none(),
            }
        }

        /// Serde `deserialize_with` for `Option<OffsetDateTime>`.
        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<OffsetDateTime>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|s| OffsetDateTime::parse(&s, &Rfc3339).map_err(serde::de::Error::custom))
                .transpose()
        }
    }
}

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
        // Serializing these types cannot fail: every map key is a string.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

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

/// Why a `failed` outcome was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureReason {
    /// A field broke a rule; `detail` names it.
    InvalidRequest,
    /// `return_url`'s origin is not in `RETURN_URL_ALLOWLIST`.
    ReturnUrlNotAllowed,
    /// The SMTP server refused permanently (5xx).
    RecipientRejected,
    /// Transient failures lasted past `MAIL_RETRY_WINDOW_SECONDS`.
    DeliveryFailed,
}

impl FailureReason {
    /// The wire name (`invalid_request`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::ReturnUrlNotAllowed => "return_url_not_allowed",
            Self::RecipientRejected => "recipient_rejected",
            Self::DeliveryFailed => "delivery_failed",
        }
    }
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

/// Reads the id of a message, however broken the rest: the dead-letter tools
/// and the undecodable path use it.
pub fn peek_id(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct IdOnly {
        id: Value,
    }
    if body.len() > MAX_PARSED_BODY_BYTES {
        return None;
    }
    match serde_json::from_slice::<IdOnly>(body).ok()?.id {
        Value::String(s) if !s.is_empty() && s.chars().count() <= 128 => Some(s),
        _ => None,
    }
}

/// Decodes and validates a `verimail.verification.requested` body.
pub fn decode_request(body: &[u8], policy: Policy<'_>) -> Result<ValidRequest, DecodeError> {
    if body.len() > MAX_PARSED_BODY_BYTES {
        return Err(DecodeError::Undecodable(format!(
            "body of {} bytes, too large to read its id",
            body.len()
        )));
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| DecodeError::Undecodable(format!("not JSON: {e}")))?;
    let Value::Object(mut event) = value else {
        return Err(DecodeError::Undecodable(
            "not a JSON object, so not a CloudEvent".into(),
        ));
    };
    let request_id = match event.get("id") {
        // PostgreSQL text cannot hold NUL: such an id could never be recorded.
        Some(Value::String(s)) if s.contains('\0') => {
            return Err(DecodeError::Undecodable(
                "id: contains a NUL character".into(),
            ));
        }
        Some(Value::String(s)) if !s.is_empty() && s.chars().count() <= 128 => s.clone(),
        Some(Value::String(_)) => {
            return Err(DecodeError::Undecodable(
                "id: must be 1-128 characters".into(),
            ));
        }
        Some(_) => return Err(DecodeError::Undecodable("id: not a string".into())),
        None => return Err(DecodeError::Undecodable("id: missing".into())),
    };
    let mut echo = Echo {
        request_id,
        ..Echo::default()
    };
    let mut problems = Problems::default();

    if body.len() > MAX_BODY_BYTES {
        problems.broke(
            "body",
            format!("{} bytes, more than {MAX_BODY_BYTES}", body.len()),
        );
    }
    match event.get("specversion") {
        Some(Value::String(v)) if v == "1.0" => {}
        Some(_) => problems.broke("specversion", "must be \"1.0\"".into()),
        None => problems.broke("specversion", "missing".into()),
    }
    match event.get("source") {
        Some(Value::String(s)) if !s.is_empty() => echo.source = Some(s.clone()),
        Some(_) => problems.broke("source", "must be a non-empty string".into()),
        None => problems.broke("source", "missing".into()),
    }
    match event.get("type") {
        Some(Value::String(t)) if t == VERIFICATION_REQUESTED => {}
        Some(_) => problems.broke("type", format!("must be {VERIFICATION_REQUESTED}")),
        None => problems.broke("type", "missing".into()),
    }
    if let Some(t) = event.get("time") {
        let ok = t.as_str().is_some_and(|s| {
            OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).is_ok()
        });
        if !ok {
            problems.broke("time", "must be an RFC 3339 timestamp".into());
        }
    }
    match event.get("traceparent") {
        None | Some(Value::Null) => {}
        Some(Value::String(tp)) if valid_traceparent(tp) => echo.traceparent = Some(tp.clone()),
        Some(_) => problems.broke("traceparent", "must be a W3C traceparent".into()),
    }
    match event.get("datacontenttype") {
        None | Some(Value::Null) => {}
        Some(Value::String(ct)) if ct.starts_with("application/json") => {}
        Some(_) => problems.broke("datacontenttype", "must be application/json".into()),
    }

    let data = match event.remove("data") {
        Some(Value::Object(data)) => data,
        Some(_) => {
            problems.broke("data", "must be a JSON object".into());
            Map::new()
        }
        None => {
            problems.broke("data", "missing".into());
            Map::new()
        }
    };

    let user_id = field_user_id(data.get("user_id"));
    let email = field_email(data.get("email"));
    let name = optional_text(data.get("name"), 256);
    let locale = field_locale(data.get("locale"));
    let purpose = match data.get("purpose") {
        None | Some(Value::Null) => Ok(Purpose::VerifyEmail),
        Some(Value::String(p)) => p.parse(),
        Some(_) => Err("must be a string".into()),
    };
    let context = field_context(data.get("context"));
    echo.user_id = user_id.as_ref().ok().cloned();
    echo.email = email.as_ref().ok().cloned();
    echo.purpose = purpose.as_ref().ok().copied();
    echo.context = context.as_ref().ok().cloned().flatten();

    let user_id = user_id.map_err(|r| problems.broke("user_id", r)).ok();
    let email = email.map_err(|r| problems.broke("email", r)).ok();
    let name = name.map_err(|r| problems.broke("name", r)).ok().flatten();
    let locale = locale
        .map_err(|r| problems.broke("locale", r))
        .ok()
        .flatten();
    let purpose = purpose.map_err(|r| problems.broke("purpose", r)).ok();
    let context = context
        .map_err(|r| problems.broke("context", r))
        .ok()
        .flatten();
    let return_url = match field_return_url(data.get("return_url")) {
        Ok(url) => url,
        Err(rule) => {
            problems.broke("return_url", rule);
            None
        }
    };
    if let (Some(p), None) = (purpose, &return_url)
        && p.requires_return_url()
        && problems.first.is_none()
    {
        problems.broke("return_url", format!("required for purpose {p}"));
    }

    if let Some(p) = purpose
        && p.single_use()
        && !policy.single_use_links
    {
        problems.broke(
            "purpose",
            format!(
                "{p} needs TOKEN_FORMAT=v1 (itsdangerous tokens carry only the address, so the link could not be single-use)"
            ),
        );
    }
    if let Some(failure) = problems.first {
        return Err(DecodeError::Invalid {
            echo: Box::new(echo),
            failure,
        });
    }
    // Checked last: a request that is otherwise fine but points elsewhere gets
    // its own reason, so upstream can tell a config gap from a bug.
    if let Some(url) = &return_url
        && !policy.return_url_allowlist.contains(&url.origin())
    {
        return Err(DecodeError::Invalid {
            echo: Box::new(echo),
            failure: RuleBroken {
                reason: FailureReason::ReturnUrlNotAllowed,
                field: "return_url",
                rule: format!(
                    "origin {} is not in RETURN_URL_ALLOWLIST",
                    url.origin().ascii_serialization()
                ),
            },
        });
    }
    let (Some(user_id), Some(email), Some(purpose), Some(source)) =
        (user_id, email, purpose, echo.source.clone())
    else {
        // Every None above recorded a broken rule, handled before; kept total anyway.
        return Err(DecodeError::Undecodable("incomplete request".into()));
    };
    Ok(ValidRequest {
        id: echo.request_id,
        source,
        traceparent: echo.traceparent,
        data: RequestData {
            user_id,
            email,
            name,
            locale,
            purpose,
            return_url: return_url.as_ref().map(Url::to_string),
            context,
        },
        return_url,
    })
}

/// The first broken rule wins: it is what the `detail` names.
#[derive(Default)]
struct Problems {
    first: Option<RuleBroken>,
}

impl Problems {
    fn broke(&mut self, field: &'static str, rule: String) {
        if self.first.is_none() {
            self.first = Some(RuleBroken {
                reason: FailureReason::InvalidRequest,
                field,
                rule,
            });
        }
    }
}

fn field_user_id(v: Option<&Value>) -> Result<String, String> {
    match v {
        None | Some(Value::Null) => Err("missing".into()),
        Some(Value::String(s)) => {
            let n = s.chars().count();
            if n == 0 {
                Err("empty".into())
            } else if n > 128 {
                Err(format!("{n} characters, more than 128"))
            } else if s.chars().any(char::is_control) {
                Err("contains a control character".into())
            } else {
                Ok(s.clone())
            }
        }
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
        Some(Value::Number(_)) => Err("a number must be an integer".into()),
        Some(_) => Err("must be a string or an integer".into()),
    }
}

/// Checks one RFC 5322 addr-spec, as the worker and the CLI both must.
pub fn validate_email(s: &str) -> Result<(), String> {
    let n = s.chars().count();
    if n == 0 {
        return Err("empty".into());
    }
    if s.len() > 254 {
        return Err("more than 254 characters".into());
    }
    if s.chars().any(char::is_control) {
        return Err("contains a control character".into());
    }
    if s.trim() != s {
        return Err("has leading or trailing white space".into());
    }
    if !email_address::EmailAddress::is_valid(s) {
        return Err("not a valid address (RFC 5322 addr-spec)".into());
    }
    // A display name or angle brackets would make this a mailbox, not an addr-spec.
    if s.contains('<') || s.contains('>') {
        return Err("must be a bare address, without a display name".into());
    }
    Ok(())
}

fn field_email(v: Option<&Value>) -> Result<String, String> {
    match v {
        None | Some(Value::Null) => Err("missing".into()),
        Some(Value::String(s)) => validate_email(s).map(|()| s.clone()),
        Some(_) => Err("must be a string".into()),
    }
}

fn optional_text(v: Option<&Value>, max_chars: usize) -> Result<Option<String>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => validate_name(s, max_chars).map(|()| Some(s.clone())),
        Some(_) => Err("must be a string".into()),
    }
}

/// Checks a display name: bounded, and no control characters (a CR/LF in a
/// name is a header-injection attempt, never a real name).
pub fn validate_name(s: &str, max_chars: usize) -> Result<(), String> {
    let n = s.chars().count();
    if n > max_chars {
        return Err(format!("{n} characters, more than {max_chars}"));
    }
    if s.chars().any(char::is_control) {
        return Err("contains a control character".into());
    }
    Ok(())
}

/// Checks the syntax of a BCP 47 tag (`zh-Hant-TW`); unknown but well-formed
/// tags are fine, they fall back to the default locale.
pub fn validate_locale(s: &str) -> Result<(), String> {
    let ok = s.len() <= 35
        && !s.is_empty()
        && s.split('-').enumerate().all(|(i, part)| {
            (1..=8).contains(&part.len())
                && if i == 0 {
                    part.chars().all(|c| c.is_ascii_alphabetic())
                } else {
                    part.chars().all(|c| c.is_ascii_alphanumeric())
                }
        });
    if ok {
        Ok(())
    } else {
        Err(format!("`{}` is not a BCP 47 tag", truncate(s, 40)))
    }
}

fn field_locale(v: Option<&Value>) -> Result<Option<String>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => validate_locale(s).map(|()| Some(s.clone())),
        Some(_) => Err("must be a string".into()),
    }
}

fn field_return_url(v: Option<&Value>) -> Result<Option<Url>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => parse_return_url(s).map(Some),
        Some(_) => Err("must be a string".into()),
    }
}

/// Parses a `return_url`: an absolute http(s) URL of at most 2048 characters.
pub fn parse_return_url(s: &str) -> Result<Url, String> {
    if s.len() > 2048 {
        return Err("more than 2048 characters".into());
    }
    if s.chars().any(char::is_control) {
        return Err("contains a control character".into());
    }
    let url = Url::parse(s).map_err(|e| format!("not an absolute URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("must be an http or https URL".into());
    }
    Ok(url)
}

fn field_context(v: Option<&Value>) -> Result<Option<Map<String, Value>>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => {
            let size = serde_json::to_vec(m).map(|b| b.len()).unwrap_or(usize::MAX);
            if size > MAX_CONTEXT_BYTES {
                Err(format!(
                    "{size} bytes serialized, more than {MAX_CONTEXT_BYTES}"
                ))
            } else if has_nul(&Value::Object(m.clone())) {
                // PostgreSQL's jsonb cannot store \u0000.
                Err("contains a NUL character".into())
            } else {
                Ok(Some(m.clone()))
            }
        }
        Some(_) => Err("must be a JSON object".into()),
    }
}

fn has_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(m) => m.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// Parses a `--context`-style JSON string into a context object with the same rules.
pub fn parse_context(raw: &str) -> Result<Map<String, Value>, String> {
    let value: Value = serde_json::from_str(raw).map_err(|e| format!("not JSON ({e})"))?;
    field_context(Some(&value))?.ok_or_else(|| "must be a JSON object".into())
}

fn valid_traceparent(tp: &str) -> bool {
    // version-traceid-parentid-flags, lowercase hex: 2-32-16-2.
    let parts: Vec<&str> = tp.split('-').collect();
    parts.len() == 4
        && [2, 32, 16, 2]
            .iter()
            .zip(&parts)
            .all(|(len, p)| p.len() == *len && p.chars().all(|c| c.is_ascii_hexdigit()))
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let cut: String = s.chars().take(max).collect();
        format!("{cut}…")
    }
}

/// Picks the best available locale for `tag`: the exact tag, then shorter
/// prefixes (`zh-Hant-TW` → `zh-Hant` → `zh`), then `default`. Case-insensitive.
pub fn resolve_locale<'a>(tag: Option<&str>, available: &[&'a str], default: &'a str) -> &'a str {
    let Some(tag) = tag else { return default };
    let mut candidate = tag;
    loop {
        if let Some(found) = available.iter().find(|a| a.eq_ignore_ascii_case(candidate)) {
            return found;
        }
        match candidate.rfind('-') {
            Some(cut) => candidate = &candidate[..cut],
            None => return default,
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
            _ => return Err(EventError::UnknownType(ty)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn allow() -> Vec<url::Origin> {
        vec![
            Url::parse("https://app.example.com")
                .expect("a literal URL")
                .origin(),
        ]
    }

    fn request(data: Value) -> Vec<u8> {
        json!({"specversion":"1.0","id":"req-1","source":"/accounts",
               "type":"verimail.verification.requested","data":data})
        .to_string()
        .into_bytes()
    }

    fn decode(body: &[u8]) -> Result<ValidRequest, DecodeError> {
        let allow = allow();
        decode_request(
            body,
            Policy {
                return_url_allowlist: &allow,
                single_use_links: true,
            },
        )
    }

    fn failure(data: Value) -> (String, FailureReason, Echo) {
        match decode(&request(data)) {
            Err(DecodeError::Invalid { echo, failure }) => {
                (failure.detail(), failure.reason, *echo)
            }
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn the_contract_example_decodes() -> Result<(), DecodeError> {
        let body = json!({"specversion":"1.0","id":"5f1c","source":"/accounts",
            "type":"verimail.verification.requested","time":"2026-11-24T10:00:00Z",
            "datacontenttype":"application/json",
            "data":{"user_id":"42","email":"alice@example.com","name":"Alice","locale":"zh-CN",
                    "purpose":"verify_email","return_url":"https://app.example.com/welcome",
                    "context":{"signup_flow":"b"}}});
        let r = decode(body.to_string().as_bytes())?;
        assert_eq!(r.id, "5f1c");
        assert_eq!(r.data.user_id, "42");
        assert_eq!(r.data.locale.as_deref(), Some("zh-CN"));
        assert_eq!(r.data.purpose, Purpose::VerifyEmail);
        assert_eq!(
            r.data.context,
            Some(
                json!({"signup_flow":"b"})
                    .as_object()
                    .cloned()
                    .unwrap_or_default()
            )
        );
        Ok(())
    }

    #[test]
    fn an_integer_user_id_becomes_its_decimal_string() -> Result<(), DecodeError> {
        let r = decode(&request(json!({"user_id": 42, "email": "a@example.com"})))?;
        assert_eq!(r.data.user_id, "42");
        assert_eq!(r.data.purpose, Purpose::VerifyEmail);
        Ok(())
    }

    #[test]
    fn each_broken_rule_is_named() {
        let long_email = format!("{}@example.com", "a".repeat(250));
        let cases = [
            (json!({"email":"a@example.com"}), "user_id: missing"),
            (
                json!({"user_id":"","email":"a@example.com"}),
                "user_id: empty",
            ),
            (
                json!({"user_id":"x".repeat(129),"email":"a@example.com"}),
                "user_id: 129 characters, more than 128",
            ),
            (
                json!({"user_id":1.5,"email":"a@example.com"}),
                "user_id: a number must be an integer",
            ),
            (
                json!({"user_id":true,"email":"a@example.com"}),
                "user_id: must be a string or an integer",
            ),
            (json!({"user_id":"1"}), "email: missing"),
            (
                json!({"user_id":"1","email":long_email}),
                "email: more than 254 characters",
            ),
            (
                json!({"user_id":"1","email":"a@example.com\r\nBcc: x@evil.io"}),
                "email: contains a control character",
            ),
            (
                json!({"user_id":"1","email":"not-an-address"}),
                "email: not a valid address (RFC 5322 addr-spec)",
            ),
            (
                json!({"user_id":"1","email":"Alice <a@example.com>"}),
                "email: must be a bare address, without a display name",
            ),
            (
                json!({"user_id":"1","email":"a@example.com","name":"x".repeat(257)}),
                "name: 257 characters, more than 256",
            ),
            (
                json!({"user_id":"1","email":"a@example.com","name":"Eve\r\nBcc: x@evil.io"}),
                "name: contains a control character",
            ),
            (
                json!({"user_id":"1","email":"a@example.com","locale":"not a tag"}),
                "locale: `not a tag` is not a BCP 47 tag",
            ),
            (
                json!({"user_id":"1","email":"a@example.com","purpose":"delete_account"}),
                "purpose: unknown purpose `delete_account` (expected verify_email or reset_password)",
            ),
            (
                json!({"user_id":"1","email":"a@example.com","return_url":"/relative"}),
                "return_url: not an absolute URL (relative URL without a base)",
            ),
            (
                json!({"user_id":"1","email":"a@example.com","return_url":"javascript:alert(1)"}),
                "return_url: must be an http or https URL",
            ),
            (
                json!({"user_id":"1","email":"a@example.com","purpose":"reset_password"}),
                "return_url: required for purpose reset_password",
            ),
            (
                json!({"user_id":"1","email":"a@example.com","context":[1]}),
                "context: must be a JSON object",
            ),
            (
                json!({"user_id":"1","email":"a@example.com","context":{"k":"v".repeat(5000)}}),
                "context: 5008 bytes serialized, more than 4096",
            ),
        ];
        for (data, expected) in cases {
            let (detail, reason, _) = failure(data.clone());
            assert_eq!(detail, expected, "for {data}");
            assert_eq!(reason, FailureReason::InvalidRequest);
        }
    }

    #[test]
    fn a_valid_field_is_echoed_even_when_another_breaks() {
        let (_, _, echo) = failure(json!({"user_id":"7","email":"bad","context":{"k":1}}));
        assert_eq!(echo.user_id.as_deref(), Some("7"));
        assert_eq!(echo.email, None);
        assert_eq!(echo.purpose, Some(Purpose::VerifyEmail));
        assert_eq!(echo.context.map(Value::Object), Some(json!({"k":1})));
    }

    #[test]
    fn single_use_purposes_need_v1_links() {
        let allow = allow();
        let body = request(
            json!({"user_id":"1","email":"a@example.com","purpose":"reset_password",
                                  "return_url":"https://app.example.com/reset"}),
        );
        let policy = Policy {
            return_url_allowlist: &allow,
            single_use_links: false,
        };
        match decode_request(&body, policy) {
            Err(DecodeError::Invalid { failure, .. }) => {
                assert_eq!(failure.field, "purpose");
                assert!(failure.rule.contains("TOKEN_FORMAT=v1"), "{}", failure.rule);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_foreign_return_url_has_its_own_reason() {
        let (detail, reason, _) = failure(
            json!({"user_id":"1","email":"a@example.com","return_url":"https://evil.example.net/x"}),
        );
        assert_eq!(reason, FailureReason::ReturnUrlNotAllowed);
        assert!(
            detail.starts_with("return_url: origin https://evil.example.net"),
            "{detail}"
        );
    }

    #[test]
    fn envelope_rules_are_named() {
        let cases = [
            (
                json!({"specversion":"0.3","id":"x","source":"/a","type":VERIFICATION_REQUESTED,"data":{}}),
                "specversion",
            ),
            (
                json!({"specversion":"1.0","id":"x","type":VERIFICATION_REQUESTED,"data":{}}),
                "source",
            ),
            (
                json!({"specversion":"1.0","id":"x","source":"/a","type":"other","data":{}}),
                "type",
            ),
            (
                json!({"specversion":"1.0","id":"x","source":"/a","type":VERIFICATION_REQUESTED}),
                "data",
            ),
            (
                json!({"specversion":"1.0","id":"x","source":"/a","type":VERIFICATION_REQUESTED,"time":"yesterday","data":{}}),
                "time",
            ),
        ];
        for (body, field) in cases {
            match decode(body.to_string().as_bytes()) {
                Err(DecodeError::Invalid { failure, .. }) => assert_eq!(failure.field, field),
                other => panic!("{body}: {other:?}"),
            }
        }
    }

    #[test]
    fn bodies_that_are_not_cloudevents_are_undecodable() {
        for body in [
            &b"not json"[..],
            b"[1,2]",
            b"{}",
            b"{\"id\":7}",
            b"{\"id\":\"\"}",
            b"\xff\xfe",
        ] {
            assert!(
                matches!(decode(body), Err(DecodeError::Undecodable(_))),
                "{body:?}"
            );
        }
    }

    #[test]
    fn an_oversized_body_names_body_but_keeps_its_id() {
        let big = request(json!({"user_id":"1","email":"a@example.com","pad":"x".repeat(70_000)}));
        match decode(&big) {
            Err(DecodeError::Invalid { echo, failure }) => {
                assert_eq!(failure.field, "body");
                assert_eq!(echo.request_id, "req-1");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn locales_fall_back_along_their_subtags() {
        let available = ["en", "zh-CN", "zh-Hant"];
        assert_eq!(
            resolve_locale(Some("zh-Hant-TW"), &available, "en"),
            "zh-Hant"
        );
        assert_eq!(resolve_locale(Some("zh-cn"), &available, "en"), "zh-CN");
        assert_eq!(resolve_locale(Some("zh"), &available, "en"), "en");
        assert_eq!(resolve_locale(Some("fr-CA"), &available, "en"), "en");
        assert_eq!(resolve_locale(None, &available, "en"), "en");
    }

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
