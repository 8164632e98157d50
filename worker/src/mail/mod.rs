//! Rendering and sending mail.
//!
//! - [`templates`]: the built-in templates (`worker/templates/`, embedded) and
//!   overrides from `TEMPLATES_DIR`; [`Templates::render`] picks the locale.
//! - [`send`]: [`Mailer`] builds the MIME message and delivers it over pooled
//!   SMTP or into a `file://` outbox; [`SendError::classification`] is the one
//!   place deciding whether a failure is worth retrying.
//!
//! Invariants: a recipient's name is data, never template source (it cannot
//! inject template syntax, HTML or headers); every delivery attempt ends within
//! a deadline, so a stuck SMTP server cannot hold a worker's slots forever.

pub mod send;
pub mod templates;

use std::time::Duration;

use time::OffsetDateTime;
use verimail_shared::events::Purpose;

pub use send::{ATTEMPT_TIMEOUT, CONNECT_TIMEOUT, Mailer, MailerError, SendError, classify};
pub use templates::{DEFAULT_LOCALE, TemplateError, Templates};

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

/// Whether a failed delivery may succeed later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Classification {
    /// 4xx, connection refused or reset, timeouts: retry.
    Transient,
    /// 5xx: give up at once (`recipient_rejected`).
    Permanent,
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
