//! Delivery through HTTP APIs: Amazon SES, Postmark, SendGrid, Mailgun and
//! the generic signed `https://` target.
//!
//! One [`reqwest::Client`] per target keeps its connections open (HTTP/1.1
//! keep-alive, TLS on rustls with ring, the system's CA store): after the
//! first mail there is no DNS lookup, TCP or TLS handshake per mail. Each
//! provider's request is its own documented send call ([`providers`],
//! [`ses`]); what its answer means is judged by [`judge`] and
//! [`super::classify`].

pub mod providers;
pub mod ses;

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use secrecy::SecretString;
use time::OffsetDateTime;
use url::Url;
use verimail_shared::config::{ApiProvider, ApiTarget};

use super::{MailerError, SendError};

/// Longest a connection to an API may take to open (TCP and TLS).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest `Retry-After` we honour: a broken header must not stop mail for a day.
pub const MAX_PAUSE: Duration = Duration::from_secs(3600);
/// Most characters of a provider's error kept in the outcome's detail.
const MAX_DETAIL: usize = 500;

/// One mail as the APIs take it: the rendered parts and the raw MIME message
/// (the very bytes SMTP would send).
#[derive(Debug)]
pub struct ApiMail<'a> {
    /// The request id (metadata the provider hands back in its webhooks).
    pub request_id: &'a str,
    /// `From`, as a mailbox (`verimail <no-reply@example.com>`).
    pub from: &'a str,
    /// The sender's address alone.
    pub from_email: &'a str,
    /// The sender's display name, if any.
    pub from_name: Option<&'a str>,
    /// The recipient's address.
    pub to_email: &'a str,
    /// The recipient's display name, if any.
    pub to_name: Option<&'a str>,
    /// `To`, as a mailbox.
    pub to: &'a str,
    /// Subject.
    pub subject: &'a str,
    /// Plain-text body.
    pub text: &'a str,
    /// HTML body.
    pub html: &'a str,
    /// Our `Message-ID` header's value.
    pub message_id: &'a str,
    /// The whole RFC 5322 message.
    pub raw: &'a [u8],
}

/// An HTTP API target, ready to send.
#[derive(Debug)]
pub struct ApiTransport {
    client: reqwest::Client,
    provider: Provider,
    /// The base URL every request of this target goes to.
    base: Url,
    /// Names the target in pauses, metrics and logs, without secrets.
    key: String,
}

/// The provider and what it needs to authenticate.
#[derive(Debug)]
enum Provider {
    Ses(ses::Signer),
    Postmark(SecretString),
    Sendgrid(SecretString),
    Mailgun { key: SecretString, domain: String },
    Generic { secret: SecretString },
}

impl ApiTransport {
    /// A transport for `target`; `secret` is `VERIMAIL_SECRET_KEY` (signs
    /// the generic target's requests), `concurrency` the most mails in flight.
    pub fn new(
        target: &ApiTarget,
        secret: Option<&str>,
        concurrency: usize,
    ) -> Result<Self, MailerError> {
        let base_raw = target
            .endpoint
            .as_ref()
            .map(|u| u.as_str().to_owned())
            .unwrap_or_else(|| target.provider.default_base());
        let base = Url::parse(&base_raw).map_err(|source| MailerError::Endpoint {
            url: base_raw.clone(),
            source,
        })?;
        let provider = match &target.provider {
            ApiProvider::Ses { region } => Provider::Ses(ses::Signer::from_env(region)?),
            ApiProvider::Postmark { token } => Provider::Postmark(token.clone()),
            ApiProvider::Sendgrid { key } => Provider::Sendgrid(key.clone()),
            ApiProvider::Mailgun { key, domain, .. } => Provider::Mailgun {
                key: key.clone(),
                domain: domain.clone(),
            },
            ApiProvider::Generic { .. } => Provider::Generic {
                secret: SecretString::from(secret.ok_or(MailerError::NoSecretKey)?.to_owned()),
            },
        };
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .pool_max_idle_per_host(concurrency.max(1))
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(concat!("verimail/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(MailerError::HttpClient)?;
        let mut key = format!(
            "{}:{}",
            target.provider.name(),
            base.host_str().unwrap_or_default()
        );
        if let Some(port) = base.port() {
            key.push_str(&format!(":{port}"));
        }
        match &target.provider {
            ApiProvider::Mailgun { domain, .. } => key.push_str(&format!("/{domain}")),
            // The path may carry a secret (a hook's token): the key goes into
            // logs and a metric label, so it names the path by a hash only.
            ApiProvider::Generic { url } => key.push_str(&format!(
                "/~{:08x}",
                super::message::fnv1a(url.path()) >> 32
            )),
            _ => {}
        }
        Ok(Self {
            client,
            provider,
            base,
            key,
        })
    }

    /// Names this target without secrets (`postmark:api.postmarkapp.com`).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The provider's name (`ses`, `postmark`, `sendgrid`, `mailgun`, `http`).
    pub fn name(&self) -> &'static str {
        match self.provider {
            Provider::Ses(_) => "ses",
            Provider::Postmark(_) => "postmark",
            Provider::Sendgrid(_) => "sendgrid",
            Provider::Mailgun { .. } => "mailgun",
            Provider::Generic { .. } => "http",
        }
    }

    /// Sends one mail; the provider's message id when it gives one.
    pub async fn send(&self, mail: &ApiMail<'_>) -> Result<Option<String>, SendError> {
        let name = self.name();
        let request = match &self.provider {
            Provider::Ses(signer) => {
                let url = join(&self.base, "v2/email/outbound-emails");
                let body = ses::body(mail);
                let headers = signer
                    .sign(&url, &body)
                    .map_err(|source| SendError::Signing {
                        provider: name,
                        source,
                    })?;
                let mut request = self
                    .client
                    .post(url)
                    .header("content-type", "application/json");
                for (name, value) in headers {
                    request = request.header(name, value);
                }
                request.body(body)
            }
            Provider::Postmark(token) => providers::postmark(&self.client, &self.base, token, mail),
            Provider::Sendgrid(key) => providers::sendgrid(&self.client, &self.base, key, mail),
            Provider::Mailgun { key, domain } => {
                providers::mailgun(&self.client, &self.base, key, domain, mail)
            }
            Provider::Generic { secret } => {
                providers::generic(&self.client, &self.base, secret, mail)
            }
        };
        let response = request
            .send()
            .await
            .map_err(|source| SendError::HttpTransport {
                provider: name,
                source,
            })?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response
            .bytes()
            .await
            .map_err(|source| SendError::HttpTransport {
                provider: name,
                source,
            })?;
        judge(name, status, &headers, &body)
    }
}

/// What an API's answer means: the message id of an accepted mail, or the
/// error (with the recipient flag and the pause the answer asks for).
pub fn judge(
    provider: &'static str,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Option<String>, SendError> {
    let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    if status.is_success() {
        return providers::message_id(provider, headers, json.as_ref(), status.as_u16(), body);
    }
    let (detail, recipient) = providers::error(provider, headers, json.as_ref(), body);
    let mut detail = detail;
    if detail.chars().count() > MAX_DETAIL {
        detail = detail.chars().take(MAX_DETAIL).collect::<String>() + "…";
    }
    Err(SendError::HttpStatus {
        provider,
        status: status.as_u16(),
        detail,
        recipient,
        retry_after: retry_after(headers, OffsetDateTime::now_utc()),
    })
}

/// `Retry-After` as seconds or an HTTP date (RFC 9110, 10.2.3), else
/// SendGrid's `X-RateLimit-Reset` (epoch seconds); at most [`MAX_PAUSE`].
pub fn retry_after(headers: &HeaderMap, now: OffsetDateTime) -> Option<Duration> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let until = |at: OffsetDateTime| {
        let secs = (at - now).as_seconds_f64().max(0.0);
        Duration::try_from_secs_f64(secs).ok()
    };
    let wait = if let Some(value) = header("retry-after") {
        match value.parse::<u64>() {
            Ok(secs) => Some(Duration::from_secs(secs)),
            Err(_) => http_date(value).and_then(until),
        }
    } else if let Some(reset) = header("x-ratelimit-reset") {
        let at = reset.parse::<i64>().ok()?;
        OffsetDateTime::from_unix_timestamp(at).ok().and_then(until)
    } else {
        None
    };
    wait.map(|w| w.min(MAX_PAUSE))
}

/// An IMF-fixdate, `Sun, 06 Nov 1994 08:49:37 GMT`.
fn http_date(value: &str) -> Option<OffsetDateTime> {
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    time::PrimitiveDateTime::parse(value, format)
        .ok()
        .map(time::PrimitiveDateTime::assume_utc)
}

/// `base` with `path` appended to its path.
fn join(base: &Url, path: &str) -> Url {
    let mut url = base.clone();
    let joined = format!("{}/{path}", base.path().trim_end_matches('/'));
    url.set_path(&joined);
    url
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn retry_after_takes_seconds_dates_and_sendgrids_reset_and_is_capped() {
        let now =
            OffsetDateTime::from_unix_timestamp(784_111_777).unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h, now), None);
        h.insert("retry-after", HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(7)));
        // 784111777 is Sun, 06 Nov 1994 08:49:37 GMT.
        h.insert(
            "retry-after",
            HeaderValue::from_static("Sun, 06 Nov 1994 08:50:07 GMT"),
        );
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(30)));
        h.insert("retry-after", HeaderValue::from_static("999999"));
        assert_eq!(retry_after(&h, now), Some(MAX_PAUSE));
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-reset", HeaderValue::from_static("784111780"));
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(3)));
    }

    #[test]
    fn answers_are_classified_as_the_contract_says() {
        use crate::mail::{Classification, classify, pause_for};
        let none = HeaderMap::new();
        let judged = |status: u16, headers: &HeaderMap, body: &str| {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::IM_A_TEAPOT);
            judge("postmark", status, headers, body.as_bytes())
        };
        let ok = judged(
            200,
            &none,
            r#"{"MessageID":"abc","ErrorCode":0,"Message":"OK"}"#,
        );
        assert_eq!(ok.ok().flatten().as_deref(), Some("abc"));
        let mut later = HeaderMap::new();
        later.insert("retry-after", HeaderValue::from_static("2"));
        for (status, headers, body, class, pause) in [
            (
                429,
                &later,
                "{}",
                Classification::Transient,
                Some(Duration::from_secs(2)),
            ),
            (
                429,
                &none,
                "{}",
                Classification::Transient,
                Some(crate::mail::DEFAULT_PAUSE),
            ),
            (
                503,
                &later,
                "{}",
                Classification::Transient,
                Some(Duration::from_secs(2)),
            ),
            (500, &none, "{}", Classification::Transient, None),
            (
                401,
                &none,
                r#"{"ErrorCode":10,"Message":"Bad or missing API token"}"#,
                Classification::ProviderRejected,
                None,
            ),
            (
                422,
                &none,
                r#"{"ErrorCode":406,"Message":"inactive"}"#,
                Classification::RecipientRejected,
                None,
            ),
            (
                422,
                &none,
                r#"{"ErrorCode":300,"Message":"Invalid 'From' address"}"#,
                Classification::ProviderRejected,
                None,
            ),
        ] {
            let Err(e) = judged(status, headers, body) else {
                panic!("{status} must fail");
            };
            assert_eq!(classify(&e), class, "{status} {body}");
            assert_eq!(pause_for(&e), pause, "{status} {body}");
        }
        // A 200 that refuses (Postmark reports some errors so).
        let refused = judged(200, &none, r#"{"ErrorCode":406,"Message":"inactive"}"#);
        assert!(refused.is_err_and(|e| classify(&e) == Classification::RecipientRejected));
    }

    #[test]
    fn endpoint_paths_are_joined_under_the_base() -> Result<(), url::ParseError> {
        let base = Url::parse("http://127.0.0.1:8005")?;
        assert_eq!(
            join(&base, "v2/email/outbound-emails").as_str(),
            "http://127.0.0.1:8005/v2/email/outbound-emails"
        );
        let base = Url::parse("https://proxy.example.com/ses/")?;
        assert_eq!(
            join(&base, "email").as_str(),
            "https://proxy.example.com/ses/email"
        );
        Ok(())
    }
}
