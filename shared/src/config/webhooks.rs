//! `WEBHOOK_SECRETS`: how the gateway authenticates each provider's bounce
//! and complaint notifications (issue 17).
//!
//! `mailgun=SIGNING_KEY,sendgrid=PUBLIC_KEY_BASE64,postmark=USER:PASSWORD,ses=TOPICS`.
//! A provider not named answers 404. SES needs no secret (SNS signs with
//! Amazon's certificate), but it is still enabled only by being named, so an
//! operator opts in to every webhook the same way: `ses=*` accepts any topic,
//! `ses=ARN|ARN` only notifications of those topics (AWS advises rejecting
//! unexpected topics).

use std::fmt;

use base64::Engine;
use secrecy::{ExposeSecret, SecretString};

/// DER prefix of a P-256 SubjectPublicKeyInfo: the 65-byte uncompressed
/// point follows it (SendGrid shows the whole SPKI, base64).
pub const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// Which SNS topics the SES webhook accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SesTopics {
    /// `ses=*`: any topic (the signature is still checked).
    Any,
    /// `ses=ARN|ARN`: only these.
    Only(Vec<String>),
}

impl SesTopics {
    /// Whether a notification of `topic_arn` is accepted.
    pub fn accepts(&self, topic_arn: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Only(arns) => arns.iter().any(|a| a == topic_arn),
        }
    }
}

/// The parsed `WEBHOOK_SECRETS`; `Debug` names the providers, never a secret.
#[derive(Clone, Default)]
pub struct WebhookSecrets {
    /// Mailgun's HTTP webhook signing key.
    pub mailgun: Option<SecretString>,
    /// SendGrid's verification key: the uncompressed P-256 point (65 bytes).
    pub sendgrid: Option<Vec<u8>>,
    /// Postmark's basic-auth user and password.
    pub postmark: Option<(String, SecretString)>,
    /// SES (SNS) topics.
    pub ses: Option<SesTopics>,
}

impl fmt::Debug for WebhookSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSecrets")
            .field("mailgun", &self.mailgun.is_some())
            .field("sendgrid", &self.sendgrid.is_some())
            .field("postmark", &self.postmark.as_ref().map(|(user, _)| user))
            .field("ses", &self.ses)
            .finish()
    }
}

impl WebhookSecrets {
    /// Parses the variable's value; the error (never echoing a secret) names
    /// the provider at fault.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let mut secrets = Self::default();
        for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let Some((name, value)) = entry.split_once('=') else {
                let shown: String = entry.chars().take(16).collect();
                return Err(format!(
                    "entry `{shown}…` is not provider=secret (mailgun, sendgrid, postmark, ses)"
                ));
            };
            let (name, value) = (name.trim(), value.trim());
            if value.is_empty() {
                return Err(format!("{name}: empty secret"));
            }
            let taken = match name {
                "mailgun" => secrets
                    .mailgun
                    .replace(SecretString::from(value.to_owned()))
                    .is_some(),
                "sendgrid" => secrets.sendgrid.replace(sendgrid_key(value)?).is_some(),
                "postmark" => {
                    let Some((user, password)) = value.split_once(':') else {
                        return Err("postmark: expected USER:PASSWORD".into());
                    };
                    if user.is_empty() || password.is_empty() {
                        return Err("postmark: expected USER:PASSWORD, both non-empty".into());
                    }
                    secrets
                        .postmark
                        .replace((user.to_owned(), SecretString::from(password.to_owned())))
                        .is_some()
                }
                "ses" => {
                    let topics = if value == "*" {
                        SesTopics::Any
                    } else {
                        let arns: Vec<String> = value
                            .split('|')
                            .map(str::trim)
                            .filter(|a| !a.is_empty())
                            .map(str::to_owned)
                            .collect();
                        if let Some(bad) = arns.iter().find(|a| !a.starts_with("arn:aws")) {
                            return Err(format!(
                                "ses: `{bad}` is not a topic ARN (expected * or arn:aws:sns:REGION:ACCOUNT:TOPIC, several separated by |)"
                            ));
                        }
                        SesTopics::Only(arns)
                    };
                    secrets.ses.replace(topics).is_some()
                }
                other => {
                    let shown: String = other.chars().take(32).collect();
                    return Err(format!(
                        "unknown provider `{shown}` (expected mailgun, sendgrid, postmark, ses)"
                    ));
                }
            };
            if taken {
                return Err(format!("{name} is named twice"));
            }
        }
        Ok(secrets)
    }

    /// Whether `provider`'s webhook is on (named in the variable).
    pub fn enabled(&self, provider: &str) -> bool {
        match provider {
            "mailgun" => self.mailgun.is_some(),
            "sendgrid" => self.sendgrid.is_some(),
            "postmark" => self.postmark.is_some(),
            "ses" => self.ses.is_some(),
            _ => false,
        }
    }

    /// Mailgun's signing key, as bytes.
    pub fn mailgun_key(&self) -> Option<&[u8]> {
        self.mailgun.as_ref().map(|k| k.expose_secret().as_bytes())
    }
}

/// SendGrid's key as its dashboard shows it (base64 of a DER P-256
/// SubjectPublicKeyInfo) → the bare point ring verifies with.
fn sendgrid_key(value: &str) -> Result<Vec<u8>, String> {
    let der = base64::engine::general_purpose::STANDARD
        .decode(value)
        .map_err(|_| "sendgrid: the public key is not base64".to_owned())?;
    match der.strip_prefix(&P256_SPKI_PREFIX[..]) {
        Some(point) if point.len() == 65 && point[0] == 4 => Ok(point.to_vec()),
        _ => Err("sendgrid: the public key is not an ECDSA P-256 key (base64 of its DER SubjectPublicKeyInfo, as the Event Webhook settings show it)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sendgrid-go's test vector key.
    const SENDGRID: &str = "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE83T4O/n84iotIvIW4mdBgQ/7dAfSmpqIM8kF9mN1flpVKS3GRqe62gw+2fNNRaINXvVpiglSI8eNEc6wEA3F+g==";

    #[test]
    fn every_provider_parses_and_only_named_ones_are_enabled() {
        let s = WebhookSecrets::parse(&format!(
            "mailgun=key-1, sendgrid={SENDGRID},postmark=hooks:pa:ss"
        ))
        .unwrap_or_default();
        assert_eq!(s.mailgun_key(), Some(&b"key-1"[..]));
        assert_eq!(s.sendgrid.as_ref().map(Vec::len), Some(65));
        assert_eq!(
            s.postmark
                .as_ref()
                .map(|(u, p)| (u.as_str(), p.expose_secret())),
            Some(("hooks", "pa:ss"))
        );
        assert!(s.enabled("mailgun") && s.enabled("sendgrid") && s.enabled("postmark"));
        assert!(!s.enabled("ses"));
        assert!(!format!("{s:?}").contains("key-1"));
        assert!(!format!("{s:?}").contains("pa:ss"));

        let s = WebhookSecrets::parse("ses=*").unwrap_or_default();
        assert!(s.enabled("ses") && !s.enabled("mailgun"));
        assert!(s.ses.as_ref().is_some_and(|t| t.accepts("arn:aws:sns:x")));
        let s = WebhookSecrets::parse("ses=arn:aws:sns:us-east-1:1:a|arn:aws:sns:us-east-1:1:b")
            .unwrap_or_default();
        let topics = s.ses.unwrap_or(SesTopics::Any);
        assert!(topics.accepts("arn:aws:sns:us-east-1:1:b"));
        assert!(!topics.accepts("arn:aws:sns:us-east-1:1:c"));
    }

    #[test]
    fn a_wrong_entry_is_named_without_its_secret() {
        for (raw, expected) in [
            ("mailgun", "is not provider=secret"),
            ("mailgun=", "mailgun: empty secret"),
            ("sparkpost=abc", "unknown provider `sparkpost`"),
            (
                "sendgrid=not*base64",
                "sendgrid: the public key is not base64",
            ),
            (
                "sendgrid=AAAA",
                "sendgrid: the public key is not an ECDSA P-256 key",
            ),
            ("postmark=nopassword", "postmark: expected USER:PASSWORD"),
            ("ses=topic", "ses: `topic` is not a topic ARN"),
            ("mailgun=a,mailgun=b", "mailgun is named twice"),
        ] {
            let err = WebhookSecrets::parse(raw).err().unwrap_or_default();
            assert!(err.contains(expected), "{raw}: {err}");
        }
        let err = WebhookSecrets::parse("mailgun=hunter2-secret,oops")
            .err()
            .unwrap_or_default();
        assert!(!err.contains("hunter2"), "{err}");
    }
}
