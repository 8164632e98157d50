//! Rendering and sending mail.
//!
//! - [`templates`]: the built-in templates (`worker/templates/`, embedded) and
//!   overrides from `TEMPLATES_DIR`; [`Templates::render`] picks the locale.
//! - [`message`]: the MIME message every transport sends ([`Composer`]);
//!   `mime` writes its parts, `headers` its `To` and `Subject`, `date` its
//!   `Date`.
//! - [`mailer`]: [`Mailer`] picks the transport `MAIL_URL` names, bounds each
//!   attempt by a deadline and retries transient failures with backoff.
//! - [`smtp`]: our SMTP connection pool, one transaction per mail, pipelined.
//! - [`http`]: the HTTP APIs (SES, Postmark, SendGrid, Mailgun, generic).
//! - [`pause`]: targets paused for the whole namespace (`Retry-After`, 421/454).
//! - [`pace`]: `MAIL_RATE_LIMIT`, one budget of send slots for the namespace.
//! - [`outbox`]: the `file://` outbox, one `.eml` file per mail.
//! - [`failure`]: [`SendError`], and [`classify`], the one place deciding
//!   what a failure means: retry, `recipient_rejected`, or `delivery_failed`.
//!
//! Invariants: a recipient's name is data, never template source (it cannot
//! inject template syntax, HTML or headers); every delivery attempt ends within
//! a deadline, so a stuck SMTP server cannot hold a worker's slots forever.

mod date;
pub mod failure;
mod headers;
pub mod http;
pub mod mailer;
pub mod message;
mod mime;
pub mod outbox;
pub mod pace;
pub mod pause;
pub mod smtp;
pub mod templates;
#[cfg(test)]
mod test_support;

use std::time::Duration;

use time::OffsetDateTime;
use verimail_shared::events::Purpose;

pub use failure::{DEFAULT_PAUSE, SendError, SmtpStep, classify, pause_for};
pub use mailer::{ATTEMPT_TIMEOUT, Mailer, MailerError};
pub use message::Composer;
pub use smtp::CONNECT_TIMEOUT;
pub use templates::{DEFAULT_LOCALE, TemplateError, Templates};

/// What a template sees.
#[derive(Debug, Clone)]
pub struct MailContext<'a> {
    /// Recipient's display name (escaped by the HTML template).
    pub name: Option<&'a str>,
    /// Recipient's address.
    pub email: &'a str,
    /// The confirm link; `None` with `CONFIRM_METHOD=code` (no link in the mail).
    pub link: Option<&'a str>,
    /// The one-time code; `None` with `CONFIRM_METHOD=link`. Never logged.
    pub code: Option<&'a str>,
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

/// What a failed delivery means for the request ([`classify`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Classification {
    /// 4xx, connection refused or reset, timeouts: retry.
    Transient,
    /// The recipient itself was refused (5.1.x, or 550/551/553 to `RCPT TO`
    /// without an enhanced code), or its address is unusable: the request
    /// ends `failed`/`recipient_rejected` at once.
    RecipientRejected,
    /// The server refused the sender, our credentials, the relay or the
    /// message: sending again cannot pass until an operator changes something,
    /// so the request ends `failed`/`delivery_failed` at once and its copy is
    /// dead-lettered for `verimail dead replay`.
    Refused(Refusal),
    /// An HTTP API refused the mail for good (a 4xx other than 429, not
    /// about the recipient): `failed`/`provider_rejected`, its words in the detail.
    ProviderRejected,
}

/// Who or what a [`Classification::Refused`] refusal was about; it opens the
/// outcome's `detail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A 5xx to `MAIL FROM`: the envelope sender (`MAIL_FROM`).
    Sender,
    /// A 5xx to `AUTH`: the credentials in `MAIL_URL`.
    Authentication,
    /// A 5.7.x refusal (relaying denied, policy, sender not authorized).
    Policy,
    /// A 5xx to the message itself (`DATA`): size, content.
    Message,
    /// Any other 5xx to `RCPT TO` (an enhanced code that is not about the
    /// recipient's address, say 5.2.x or 5.3.x).
    Other,
}

impl Refusal {
    /// The words that open the outcome's `detail`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sender => "sender refused",
            Self::Authentication => "authentication refused",
            Self::Policy => "policy refused",
            Self::Message => "message refused",
            Self::Other => "refused",
        }
    }
}

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
