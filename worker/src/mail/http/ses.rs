//! Amazon SES v2 `SendEmail` with `Content.Raw` (the very MIME message SMTP
//! would send), signed with SigV4 by AWS's own `aws-sigv4` crate.
//!
//! Credentials come from `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and,
//! for temporary ones, `AWS_SESSION_TOKEN`, read once at start. SES
//! replaces our `Message-ID` with its own: the `MessageId` it answers is what
//! its bounce notifications name, and is kept with the request.

use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use base64::Engine;
use url::Url;

use super::ApiMail;
use crate::mail::MailerError;

/// Signs SES requests for one region.
pub struct Signer {
    identity: Identity,
    region: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Credentials from the process environment.
    pub fn from_env(region: &str) -> Result<Self, MailerError> {
        let var = |name: &'static str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let id =
            var("AWS_ACCESS_KEY_ID").ok_or(MailerError::AwsCredentials("AWS_ACCESS_KEY_ID"))?;
        let secret = var("AWS_SECRET_ACCESS_KEY")
            .ok_or(MailerError::AwsCredentials("AWS_SECRET_ACCESS_KEY"))?;
        Ok(Self::new(region, &id, &secret, var("AWS_SESSION_TOKEN")))
    }

    /// Given credentials.
    pub fn new(region: &str, id: &str, secret: &str, token: Option<String>) -> Self {
        let credentials = Credentials::new(id, secret, token, None, "environment");
        Self {
            identity: credentials.into(),
            region: region.to_owned(),
        }
    }

    /// The headers that sign a `POST` of the JSON `body` to `url` now.
    pub fn sign(
        &self,
        url: &Url,
        body: &[u8],
    ) -> Result<Vec<(String, String)>, Box<dyn std::error::Error + Send + Sync>> {
        self.sign_at(url, body, SystemTime::now())
    }

    /// [`Signer::sign`] at a given time (tests compare with a fixed vector).
    pub fn sign_at(
        &self,
        url: &Url,
        body: &[u8],
        time: SystemTime,
    ) -> Result<Vec<(String, String)>, Box<dyn std::error::Error + Send + Sync>> {
        let params = v4::SigningParams::builder()
            .identity(&self.identity)
            .region(&self.region)
            .name("ses")
            .time(time)
            .settings(SigningSettings::default())
            .build()?
            .into();
        let request = SignableRequest::new(
            "POST",
            url.as_str(),
            std::iter::once(("content-type", "application/json")),
            SignableBody::Bytes(body),
        )?;
        let (instructions, _signature) = sign(request, &params)?.into_parts();
        Ok(instructions
            .headers()
            .map(|(name, value)| (name.to_owned(), value.to_owned()))
            .collect())
    }
}

/// The `SendEmail` body: the raw message, base64, and its one recipient;
/// our request id as an email tag (SES returns tags in its notifications).
pub fn body(mail: &ApiMail<'_>) -> Vec<u8> {
    let raw = base64::engine::general_purpose::STANDARD.encode(mail.raw);
    // A tag value allows only ASCII letters, digits, `_`, `-`, `.`, `@`.
    let tag: String = mail
        .request_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '@') {
                c
            } else {
                '_'
            }
        })
        .take(256)
        .collect();
    serde_json::json!({
        "Content": {"Raw": {"Data": raw}},
        "Destination": {"ToAddresses": [mail.to]},
        "EmailTags": [{"Name": "request_id", "Value": tag}],
    })
    .to_string()
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The expected value was computed independently with botocore 1.43's
    /// `SigV4Auth` (the AWS SDK for Python's signer): `sigv4_vector.py`
    /// beside this file prints it.
    #[test]
    fn a_fixed_request_is_signed_as_botocore_signs_it()
    -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let signer = Signer::new(
            "eu-west-1",
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            Some("session-token-example".into()),
        );
        let url = Url::parse("https://email.eu-west-1.amazonaws.com/v2/email/outbound-emails")?;
        let body = br#"{"Content":{"Raw":{"Data":"RnJvbTogYUBleGFtcGxlLmNvbQ0KDQpoaQ=="}},"Destination":{"ToAddresses":["b@example.com"]}}"#;
        // 2026-12-06T04:30:00Z
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_531_400);
        let headers = signer.sign_at(&url, body, at)?;
        let get = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("x-amz-date"), Some("20261206T043000Z"));
        assert_eq!(get("x-amz-security-token"), Some("session-token-example"));
        assert_eq!(
            get("authorization"),
            Some(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261206/eu-west-1/ses/aws4_request, \
                 SignedHeaders=content-type;host;x-amz-date;x-amz-security-token, \
                 Signature=56a00590e18f1b255a2e56129a3eba40d5b45187cfb23553ee3cfcb066e5c3eb"
            )
        );
        Ok(())
    }
}
