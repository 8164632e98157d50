//! The gateway's deliverability events: `verimail.email.bounced` and
//! `verimail.email.complained`, from the mail providers' notifications.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::rfc3339;

/// Who reported a bounce or complaint (`provider` of the events).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MailProvider {
    /// Mailgun's webhooks.
    Mailgun,
    /// SendGrid's Event Webhook.
    Sendgrid,
    /// Postmark's bounce and spam-complaint webhooks.
    Postmark,
    /// Amazon SES through SNS.
    Ses,
    /// Another API (the generic HTTP target, or an operator).
    Api,
}

impl MailProvider {
    /// The four providers with a webhook on the gateway.
    pub const WEBHOOKS: [Self; 4] = [Self::Mailgun, Self::Sendgrid, Self::Postmark, Self::Ses];

    /// The contract's spelling (`mailgun`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mailgun => "mailgun",
            Self::Sendgrid => "sendgrid",
            Self::Postmark => "postmark",
            Self::Ses => "ses",
            Self::Api => "api",
        }
    }
}

impl fmt::Display for MailProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MailProvider {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mailgun" => Ok(Self::Mailgun),
            "sendgrid" => Ok(Self::Sendgrid),
            "postmark" => Ok(Self::Postmark),
            "ses" => Ok(Self::Ses),
            "api" => Ok(Self::Api),
            other => Err(format!("unknown provider `{other}`")),
        }
    }
}

/// A bounce's kind (`kind` of `verimail.email.bounced`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BounceKind {
    /// Permanent: the address is dead; it is suppressed.
    Hard,
    /// Temporary (mailbox full, greylisted, blocked): published, never suppresses.
    Soft,
}

impl BounceKind {
    /// The contract's spelling (`hard`, `soft`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hard => "hard",
            Self::Soft => "soft",
        }
    }
}

/// What every deliverability event says: the address, who reported it,
/// when and why, and the request it concerns when the notification tells.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoticeData {
    /// The address that bounced or whose owner complained.
    pub email: String,
    /// Who reported it.
    pub provider: MailProvider,
    /// When the provider says it happened.
    #[serde(with = "rfc3339")]
    pub occurred_at: OffsetDateTime,
    /// The provider's words.
    pub detail: String,
    /// The request of the mail concerned, when the notification tells.
    pub request_id: Option<String>,
    /// Its user, when known.
    pub user_id: Option<String>,
}

/// `data` of `verimail.email.bounced`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BouncedData {
    /// The bounce.
    #[serde(flatten)]
    pub notice: NoticeData,
    /// Hard (suppressed) or soft.
    pub kind: BounceKind,
}

/// `data` of `verimail.email.complained` (the address is suppressed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComplainedData {
    /// The complaint.
    #[serde(flatten)]
    pub notice: NoticeData,
}
