//! Provider bounce and complaint webhooks (`POST /v1/webhooks/{provider}`):
//! authenticate each provider's notification its documented way, turn it
//! into [`Notice`]s, and record each once (see [`record`]).
//!
//! Invariants:
//! - nothing is read into the database before the notification is
//!   authenticated; one that fails answers 401 and changes nothing;
//! - a notice has one effect however often it is delivered: its provider's
//!   event key is inserted into `webhook_receipts` in the same transaction as
//!   the suppression and the outbox event, and a key seen before skips both;
//! - a hard bounce or a complaint suppresses the address; a soft bounce is
//!   only published.

pub mod providers;
pub mod record;
pub mod sns;

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{Map, Value};
use sha2::Sha256;
use time::OffsetDateTime;
use verimail_shared::config::webhooks::WebhookSecrets;
use verimail_shared::events::{BounceKind, MailProvider};

use crate::AppState;

/// Largest body read: SendGrid batches many events in one POST.
pub const MAX_BODY: usize = 4 * 1024 * 1024;

/// How far a Mailgun signature's `timestamp` may be from now, either way.
/// Mailgun's documentation asks receivers to refuse older ones: a captured
/// notification replayed later is refused even though its HMAC holds.
pub const MAILGUN_MAX_AGE: time::Duration = time::Duration::minutes(15);

/// What a notice reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum What {
    /// A bounce, hard (suppresses) or soft.
    Bounce(BounceKind),
    /// A spam complaint (suppresses).
    Complaint,
}

impl What {
    /// Whether it puts the address on the suppression list.
    pub fn suppresses(self) -> bool {
        !matches!(self, Self::Bounce(BounceKind::Soft))
    }
}

/// One bounce or complaint for one address, from an authenticated notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// The provider's unique key of this notice (deduplication).
    pub key: String,
    /// The address concerned.
    pub email: String,
    /// Bounce (hard/soft) or complaint.
    pub what: What,
    /// When it happened, per the provider (else: when we heard of it).
    pub occurred_at: Option<OffsetDateTime>,
    /// The provider's words.
    pub detail: String,
    /// Our request id, when the send put it in the provider's metadata.
    pub request_id: Option<String>,
    /// Message ids the notification names: the provider's (recorded at send
    /// time in `provider_messages`) or our own `Message-ID`.
    pub message_ids: Vec<String>,
}

/// How a webhook call ended (the `status` of the answer, and the metric's `result`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Authenticated and recorded: how many notices acted, were seen
    /// before, or were not about a bounce or complaint.
    Done {
        /// Recorded now (suppressed and/or published).
        acted: usize,
        /// Seen before: no second effect.
        duplicates: usize,
        /// Authentic, but nothing we act on (deliveries, opens, ...).
        ignored: usize,
    },
    /// An SNS subscription was confirmed.
    Confirmed,
    /// Authentication failed: nothing was changed.
    Unauthorized,
    /// The body is not what the provider sends.
    Invalid(String),
    /// The provider is not in `WEBHOOK_SECRETS`.
    NotFound,
    /// The database (or the SNS certificate) is unavailable: the provider retries.
    Unavailable,
}

/// A notification before recording: notices, plus how many authentic
/// events it held that we do not act on.
#[derive(Debug, Default)]
pub struct Parsed {
    notices: Vec<Notice>,
    ignored: usize,
}

impl Parsed {
    fn of(notices: Vec<Notice>, ignored: usize) -> Self {
        Self { notices, ignored }
    }
}

/// Authenticates and records one call of `/v1/webhooks/{provider}`.
pub async fn handle(state: &AppState, provider: &str, headers: &HeaderMap, body: &[u8]) -> Outcome {
    let secrets = &state.inner.config.webhook_secrets;
    let Ok(provider) = provider.parse::<MailProvider>() else {
        return Outcome::NotFound;
    };
    if !secrets.enabled(provider.as_str()) {
        return Outcome::NotFound;
    }
    let parsed = match provider {
        MailProvider::Mailgun => mailgun(secrets, body, OffsetDateTime::now_utc()),
        MailProvider::Sendgrid => sendgrid(secrets, headers, body),
        MailProvider::Postmark => postmark(secrets, headers, body),
        MailProvider::Ses => return ses(state, headers, body).await,
        MailProvider::Api => return Outcome::NotFound,
    };
    match parsed {
        Ok(parsed) => record_all(state, provider, parsed).await,
        Err(outcome) => outcome,
    }
}

async fn record_all(state: &AppState, provider: MailProvider, parsed: Parsed) -> Outcome {
    let recorded = tokio::time::timeout(
        crate::routes::confirm::DB_DEADLINE,
        record::record(state.pool(), provider, &parsed.notices),
    )
    .await;
    match recorded {
        Err(_) => {
            tracing::warn!(
                provider = provider.as_str(),
                "recording a webhook notification timed out"
            );
            Outcome::Unavailable
        }
        Ok(Ok(counts)) => {
            if counts.acted > 0 {
                state.inner.outbox_wake.notify_one();
            }
            Outcome::Done {
                acted: counts.acted,
                duplicates: counts.duplicates,
                ignored: parsed.ignored + counts.unusable,
            }
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, provider = provider.as_str(), "recording a webhook notification failed");
            Outcome::Unavailable
        }
    }
}

fn json(body: &[u8]) -> Result<Value, Outcome> {
    serde_json::from_slice(body).map_err(|e| Outcome::Invalid(format!("body: not JSON ({e})")))
}

fn hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Mailgun: `signature.signature` = hex HMAC-SHA256(signing key,
/// `timestamp` + `token`), and `timestamp` within [`MAILGUN_MAX_AGE`] of
/// `now`; the token keys the notice.
fn mailgun(secrets: &WebhookSecrets, body: &[u8], now: OffsetDateTime) -> Result<Parsed, Outcome> {
    let key = secrets.mailgun_key().ok_or(Outcome::NotFound)?;
    let value = json(body)?;
    let sig = value.get("signature").ok_or(Outcome::Unauthorized)?;
    let text = |k: &str| match sig.get(k) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let (Some(timestamp), Some(token), Some(signature)) =
        (text("timestamp"), text("token"), text("signature"))
    else {
        return Err(Outcome::Unauthorized);
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(key).map_err(|_| Outcome::Unauthorized)?;
    mac.update(timestamp.as_bytes());
    mac.update(token.as_bytes());
    let given = hex(&signature).ok_or(Outcome::Unauthorized)?;
    mac.verify_slice(&given)
        .map_err(|_| Outcome::Unauthorized)?;
    // Seconds since the epoch; a fraction, were Mailgun to send one, is
    // covered by the HMAC already and does not matter to the window.
    let signed_at = timestamp
        .split('.')
        .next()
        .and_then(|secs| secs.parse::<i64>().ok())
        .and_then(|secs| OffsetDateTime::from_unix_timestamp(secs).ok())
        .ok_or(Outcome::Unauthorized)?;
    if (now - signed_at).abs() > MAILGUN_MAX_AGE {
        tracing::debug!(
            %signed_at,
            "Mailgun notification refused: its signature is outside the 15-minute window"
        );
        return Err(Outcome::Unauthorized);
    }
    let Some(event) = value.get("event-data").filter(|e| e.is_object()) else {
        return Err(Outcome::Invalid("event-data: missing".into()));
    };
    Ok(match providers::mailgun(event, &token) {
        Some(notice) => Parsed::of(vec![notice], 0),
        None => Parsed::of(Vec::new(), 1),
    })
}

/// SendGrid's Signed Event Webhook: ECDSA P-256 / SHA-256 over the timestamp
/// header followed by the exact body, base64 DER signature in a header.
fn sendgrid(secrets: &WebhookSecrets, headers: &HeaderMap, body: &[u8]) -> Result<Parsed, Outcome> {
    let point = secrets.sendgrid.as_deref().ok_or(Outcome::NotFound)?;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(signature), Some(timestamp)) = (
        header("x-twilio-email-event-webhook-signature"),
        header("x-twilio-email-event-webhook-timestamp"),
    ) else {
        return Err(Outcome::Unauthorized);
    };
    let signature = base64::engine::general_purpose::STANDARD
        .decode(signature.trim())
        .map_err(|_| Outcome::Unauthorized)?;
    let signed = [timestamp.as_bytes(), body].concat();
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, point)
        .verify(&signed, &signature)
        .map_err(|_| Outcome::Unauthorized)?;
    let Value::Array(events) = json(body)? else {
        return Err(Outcome::Invalid(
            "body: must be a JSON array of events".into(),
        ));
    };
    let total = events.len();
    let notices: Vec<Notice> = events.iter().filter_map(providers::sendgrid).collect();
    let ignored = total - notices.len();
    Ok(Parsed::of(notices, ignored))
}

/// Postmark: HTTP basic auth with the configured user and password
/// (compared through HMAC tags, in constant time).
fn postmark(secrets: &WebhookSecrets, headers: &HeaderMap, body: &[u8]) -> Result<Parsed, Outcome> {
    use secrecy::ExposeSecret;
    let (user, password) = secrets.postmark.as_ref().ok_or(Outcome::NotFound)?;
    let presented = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
        .and_then(|(_, b64)| {
            base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .ok()
        })
        .ok_or(Outcome::Unauthorized)?;
    // HMAC accepts a key of any length: the error cannot happen.
    let tag = |bytes: &[u8]| {
        Hmac::<Sha256>::new_from_slice(b"verimail postmark basic auth").map(|mut mac| {
            mac.update(bytes);
            mac
        })
    };
    let expected = tag(format!("{user}:{}", password.expose_secret()).as_bytes())
        .map_err(|_| Outcome::Unauthorized)?
        .finalize()
        .into_bytes();
    tag(&presented)
        .map_err(|_| Outcome::Unauthorized)?
        .verify_slice(&expected)
        .map_err(|_| Outcome::Unauthorized)?;
    let Value::Object(record) = json(body)? else {
        return Err(Outcome::Invalid("body: must be a JSON object".into()));
    };
    Ok(match providers::postmark(&record) {
        Some(notice) => Parsed::of(vec![notice], 0),
        None => Parsed::of(Vec::new(), 1),
    })
}

/// Amazon SES through SNS: the SNS envelope's signature with the certificate
/// of its `SigningCertURL`; subscriptions are confirmed.
async fn ses(state: &AppState, headers: &HeaderMap, body: &[u8]) -> Outcome {
    let Some(topics) = state.inner.config.webhook_secrets.ses.as_ref() else {
        return Outcome::NotFound;
    };
    let message: Map<String, Value> = match json(body) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return Outcome::Invalid("body: must be an SNS message (a JSON object)".into()),
        Err(outcome) => return outcome,
    };
    let field = |k: &str| message.get(k).and_then(Value::as_str);
    let Some(ty) = field("Type") else {
        return Outcome::Invalid("Type: missing".into());
    };
    if let Some(header) = headers.get("x-amz-sns-message-type")
        && header.to_str().ok() != Some(ty)
    {
        return Outcome::Invalid("x-amz-sns-message-type does not match Type".into());
    }
    if !matches!(
        ty,
        "Notification" | "SubscriptionConfirmation" | "UnsubscribeConfirmation"
    ) {
        return Outcome::Invalid(format!(
            "Type: `{}` is not an SNS message type",
            ty.chars().take(40).collect::<String>()
        ));
    }
    let (Some(version), Some(signature), Some(cert_url)) = (
        field("SignatureVersion"),
        field("Signature"),
        field("SigningCertURL"),
    ) else {
        return Outcome::Unauthorized;
    };
    let Some(text) = sns::string_to_sign(&message) else {
        return Outcome::Invalid("a field SNS signs is missing or not a string".into());
    };
    let der = match state.inner.sns.get(state.pool(), cert_url).await {
        Ok(der) => der,
        Err(sns::CertError::NotAllowed) => {
            tracing::debug!("SNS message refused: SigningCertURL not an SNS host");
            return Outcome::Unauthorized;
        }
        Err(e) => {
            tracing::warn!(error = %e, "SNS signing certificate unavailable");
            return Outcome::Unavailable;
        }
    };
    if !sns::verify(&der, version, &text, signature) {
        return Outcome::Unauthorized;
    }
    if !field("TopicArn").is_some_and(|t| topics.accepts(t)) {
        tracing::warn!(topic = ?field("TopicArn"), "SNS message from a topic not in WEBHOOK_SECRETS refused");
        return Outcome::Unauthorized;
    }
    match ty {
        "SubscriptionConfirmation" => {
            let Some(url) = field("SubscribeURL").and_then(|u| sns::allowed_sns_url(u, false))
            else {
                return Outcome::Invalid(
                    "SubscribeURL: not https://sns.<region>.amazonaws.com/".into(),
                );
            };
            match state.inner.sns.fetcher().get(url).await {
                Ok(_) => {
                    tracing::info!(topic = ?field("TopicArn"), "SNS subscription confirmed");
                    Outcome::Confirmed
                }
                Err(e) => {
                    tracing::warn!(error = %e, "confirming the SNS subscription failed");
                    Outcome::Unavailable
                }
            }
        }
        "Notification" => {
            let sns_id = field("MessageId").unwrap_or_default();
            // A message that is not SES JSON (a test message from the console) is authentic but not ours to act on.
            let parsed = match field("Message").and_then(|m| serde_json::from_str::<Value>(m).ok())
            {
                Some(inner) => {
                    let notices = providers::ses(&inner, sns_id);
                    let ignored = usize::from(notices.is_empty());
                    Parsed::of(notices, ignored)
                }
                None => Parsed::of(Vec::new(), 1),
            };
            record_all(state, MailProvider::Ses, parsed).await
        }
        _ => Outcome::Done {
            acted: 0,
            duplicates: 0,
            ignored: 1,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_mailgun_vector_verifies() {
        // docs/design/providers.md §2.1, computed with Python's hmac.
        let secrets = WebhookSecrets::parse("mailgun=TEST_WEBHOOK_SIGNING_KEY").unwrap_or_default();
        let body = serde_json::json!({"signature": {"timestamp": "1534110422",
            "token": "1234567890abcdef1234567890abcdef",
            "signature": "29f11a17b37259d4b700f02f1eaeba94f9ab8e858f6661bc500f54433322b333"},
            "event-data": {"event": "delivered", "recipient": "a@x.test"}});
        // As if received a minute after it was signed.
        let now = signed(60);
        let parsed = mailgun(&secrets, body.to_string().as_bytes(), now);
        assert!(
            matches!(parsed, Ok(Parsed { ignored: 1, .. })),
            "{parsed:?}"
        );
        let tampered = body.to_string().replace("1534110422", "1534110423");
        assert_eq!(
            mailgun(&secrets, tampered.as_bytes(), now).err(),
            Some(Outcome::Unauthorized)
        );
    }

    /// The documented vector's signing time, plus `seconds`.
    fn signed(seconds: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_534_110_422 + seconds)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    #[test]
    fn a_mailgun_signature_more_than_15_minutes_from_now_is_refused_either_way() {
        let secrets = WebhookSecrets::parse("mailgun=TEST_WEBHOOK_SIGNING_KEY").unwrap_or_default();
        let body = serde_json::json!({"signature": {"timestamp": "1534110422",
            "token": "1234567890abcdef1234567890abcdef",
            "signature": "29f11a17b37259d4b700f02f1eaeba94f9ab8e858f6661bc500f54433322b333"},
            "event-data": {"event": "delivered", "recipient": "a@x.test"}})
        .to_string();
        let window = MAILGUN_MAX_AGE.whole_seconds();
        for at in [-window, 0, window] {
            assert!(
                mailgun(&secrets, body.as_bytes(), signed(at)).is_ok(),
                "{at}"
            );
        }
        for at in [-window - 1, window + 1, 86_400] {
            assert_eq!(
                mailgun(&secrets, body.as_bytes(), signed(at)).err(),
                Some(Outcome::Unauthorized),
                "{at}"
            );
        }
    }

    #[test]
    fn the_sendgrid_go_vector_verifies_and_a_changed_byte_does_not() {
        let secrets = WebhookSecrets::parse("sendgrid=MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE83T4O/n84iotIvIW4mdBgQ/7dAfSmpqIM8kF9mN1flpVKS3GRqe62gw+2fNNRaINXvVpiglSI8eNEc6wEA3F+g==").unwrap_or_default();
        let body = "[{\"email\":\"hello@world.com\",\"event\":\"dropped\",\"reason\":\"Bounced Address\",\"sg_event_id\":\"ZHJvcC0xMDk5NDkxOS1MUnpYbF9OSFN0T0doUTRrb2ZTbV9BLTA\",\"sg_message_id\":\"LRzXl_NHStOGhQ4kofSm_A.filterdrecv-p3mdw1-756b745b58-kmzbl-18-5F5FC76C-9.0\",\"smtp-id\":\"<LRzXl_NHStOGhQ4kofSm_A@ismtpd0039p1iad1.sendgrid.net>\",\"timestamp\":1600112492}]\r\n";
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-twilio-email-event-webhook-signature",
            axum::http::HeaderValue::from_static("MEUCIGHQVtGj+Y3LkG9fLcxf3qfI10QysgDWmMOVmxG0u6ZUAiEAyBiXDWzM+uOe5W0JuG+luQAbPIqHh89M15TluLtEZtM="),
        );
        headers.insert(
            "x-twilio-email-event-webhook-timestamp",
            axum::http::HeaderValue::from_static("1600112502"),
        );
        let parsed = sendgrid(&secrets, &headers, body.as_bytes()).map(|p| p.notices);
        let notices = parsed.unwrap_or_default();
        assert_eq!(notices.len(), 1);
        assert_eq!(notices[0].what, What::Bounce(BounceKind::Hard));
        assert_eq!(notices[0].email, "hello@world.com");
        let tampered = body.replace("hello@", "hallo@");
        assert_eq!(
            sendgrid(&secrets, &headers, tampered.as_bytes()).err(),
            Some(Outcome::Unauthorized)
        );
    }
}
