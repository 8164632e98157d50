//! Rendering and sending mail. INTERFACE STUB: the mail engineer replaces the
//! bodies; the signatures are the agreed interface (more may be added).

use std::path::Path;
use std::time::Duration;

use time::OffsetDateTime;
use verimail_shared::config::Config;
use verimail_shared::events::Purpose;

/// A template failed to load or render (a startup error when loading).
#[derive(Debug, thiserror::Error)]
#[error("template error: {0}")]
pub struct TemplateError(pub String);

/// What a template sees.
#[derive(Debug, Clone)]
pub struct MailContext<'a> {
    /// Recipient's display name (escaped by the HTML template).
    pub name: Option<&'a str>,
    /// Recipient's address.
    pub email: &'a str,
    /// The confirm link.
    pub link: &'a str,
    /// What the link is for.
    pub purpose: Purpose,
    /// When the link expires.
    pub expires_at: OffsetDateTime,
    /// How long the link stays valid.
    pub ttl: Duration,
}

/// A rendered mail.
#[derive(Debug, Clone)]
pub struct RenderedMail {
    /// Localized subject.
    pub subject: String,
    /// Plain-text body.
    pub text: String,
    /// HTML body.
    pub html: String,
    /// The locale actually used (after fallback).
    pub locale: String,
}

/// Built-in templates plus overrides from `TEMPLATES_DIR`.
#[derive(Debug)]
pub struct Templates {}

impl Templates {
    /// Loads and checks every template (a broken one is a startup error).
    pub fn load(_dir: Option<&Path>) -> Result<Self, TemplateError> {
        Err(TemplateError("not implemented yet".into()))
    }

    /// Renders the mail for `purpose` in the best locale for `locale`.
    pub fn render(
        &self,
        _locale: Option<&str>,
        _ctx: &MailContext<'_>,
    ) -> Result<RenderedMail, TemplateError> {
        Err(TemplateError("not implemented yet".into()))
    }
}

/// Whether a failed delivery may succeed later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Classification {
    /// 4xx, connection refused or reset, timeouts: retry.
    Transient,
    /// 5xx: give up at once (`recipient_rejected`).
    Permanent,
}

/// A delivery failed.
#[derive(Debug, thiserror::Error)]
#[error("delivery failed: {0}")]
pub struct SendError(pub String);

impl SendError {
    /// Transient or permanent (the one tested classification function).
    pub fn classification(&self) -> Classification {
        Classification::Transient
    }
}

/// A mailer could not be built from `MAIL_URL`/`MAIL_FROM`.
#[derive(Debug, thiserror::Error)]
#[error("MAIL_URL: {0}")]
pub struct MailerError(pub String);

/// One mail to deliver.
#[derive(Debug, Clone)]
pub struct Envelope<'a> {
    /// Recipient's display name.
    pub to_name: Option<&'a str>,
    /// Recipient's address.
    pub to_email: &'a str,
    /// Used for the `Message-ID` header, so a duplicate can be recognised downstream.
    pub request_id: &'a str,
}

/// Delivers mail over pooled SMTP or into a `file://` outbox.
#[derive(Debug, Clone)]
pub struct Mailer {}

impl Mailer {
    /// Builds the transport from the configuration (warns when `MAIL_URL` is the default).
    pub fn from_config(_config: &Config) -> Result<Self, MailerError> {
        Err(MailerError("not implemented yet".into()))
    }

    /// Sends once.
    pub async fn send(&self, _to: &Envelope<'_>, _mail: &RenderedMail) -> Result<(), SendError> {
        Err(SendError("not implemented yet".into()))
    }

    /// Sends, retrying transient failures in-process with exponential backoff
    /// and jitter for at most `budget`; returns the last error otherwise.
    pub async fn send_with_backoff(
        &self,
        to: &Envelope<'_>,
        mail: &RenderedMail,
        _budget: Duration,
    ) -> Result<(), SendError> {
        self.send(to, mail).await
    }
}
