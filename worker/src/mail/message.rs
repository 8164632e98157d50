//! Building the MIME message every transport sends: the same bytes whether
//! they go over SMTP, into the outbox, or to an HTTP API that takes raw MIME.

use lettre::message::{Mailbox, MultiPart};
use lettre::{Address, Message};
use verimail_shared::config::Config;

use super::{Envelope, MailerError, RenderedMail, SendError};

/// Builds messages from `MAIL_FROM`.
#[derive(Debug, Clone)]
pub struct Composer {
    /// The sender (`MAIL_FROM`).
    pub(super) from: Mailbox,
    /// Right-hand side of our `Message-ID`s: the sender's domain.
    id_domain: String,
}

impl Composer {
    /// Parses `MAIL_FROM`.
    pub fn from_config(config: &Config) -> Result<Self, MailerError> {
        let from: Mailbox = config
            .mail_from
            .parse()
            .map_err(|source| MailerError::From {
                value: config.mail_from.clone(),
                source,
            })?;
        let id_domain = from.email.domain().to_owned();
        Ok(Self { from, id_domain })
    }

    /// The `Message-ID` of the request's mail (the same on every attempt).
    pub fn message_id(&self, request_id: &str) -> String {
        message_id(request_id, &self.id_domain)
    }

    /// The MIME message: multipart/alternative (text, HTML), with a
    /// `Message-ID` derived from the request id.
    pub fn build(&self, to: &Envelope<'_>, mail: &RenderedMail) -> Result<Message, SendError> {
        let address: Address = to.to_email.parse().map_err(SendError::Address)?;
        // lettre quotes or RFC 2047-encodes the name: it cannot add a header or address.
        let name = to
            .to_name
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_owned);
        Message::builder()
            .from(self.from.clone())
            .to(Mailbox::new(name, address))
            .subject(mail.subject.clone())
            .date_now()
            .message_id(Some(self.message_id(to.request_id)))
            .multipart(MultiPart::alternative_plain_html(
                mail.text.clone(),
                mail.html.clone(),
            ))
            .map_err(SendError::Message)
    }
}

/// `<{request id, sanitized}.{hash of the raw id}@{domain}>`: the same request
/// always gives the same id (downstream can spot a duplicate), and the hash
/// keeps ids apart that sanitizing would merge.
fn message_id(request_id: &str, domain: &str) -> String {
    let clean: String = request_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    let clean = clean.trim_matches('.');
    // FNV-1a: stable across Rust versions and platforms, unlike std's hasher.
    let hash = request_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("<{clean}.{hash:016x}@{domain}>")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::mail::test_support::{TestResult, envelope, mail, mailer};
    use verimail_tests::smtp::SmtpServer;

    #[tokio::test]
    async fn a_mail_arrives_as_multipart_with_name_subject_and_message_id() -> TestResult {
        let server = SmtpServer::start();
        let m = mailer(&server.mail_url())?;
        m.send(
            &envelope(
                Some("Zoé \"Z\" <z@evil.test>, Bcc: x@evil.test"),
                "alice@example.com",
            ),
            &mail(),
        )
        .await?;
        let mails = server.wait_for_mails(1, Duration::from_secs(5)).await;
        let got = mails.first().ok_or("no mail")?;
        assert_eq!(got.to, vec!["alice@example.com".to_owned()]);
        assert_eq!(got.from, "no-reply@verimail.test");
        assert_eq!(got.subject, "请确认您的邮箱地址");
        assert_eq!(
            got.link.as_deref(),
            Some("http://127.0.0.1:8080/confirm/abc.def-ghi")
        );
        assert!(got.html.contains("<a href="));
        let raw = String::from_utf8_lossy(&got.raw);
        assert!(raw.contains("multipart/alternative"), "{raw}");
        assert!(raw.contains("Date: "), "{raw}");
        assert!(
            !raw.contains("\r\nBcc:"),
            "a name must not add a header: {raw}"
        );
        let parsed = mail_parser::MessageParser::default()
            .parse(&got.raw)
            .ok_or("unparsable mail")?;
        let to: Vec<_> = parsed.to().ok_or("no To")?.iter().collect();
        assert_eq!(to.len(), 1, "a name must not add an address: {to:?}");
        assert_eq!(to[0].address(), Some("alice@example.com"));
        assert_eq!(
            to[0].name(),
            Some("Zoé \"Z\" <z@evil.test>, Bcc: x@evil.test")
        );
        let id = got.message_id.as_deref().ok_or("no Message-ID")?;
        assert!(id.starts_with("5f1c-req_1."), "{id}");
        assert!(id.ends_with("@verimail.test"), "{id}");
        Ok(())
    }

    #[test]
    fn message_ids_are_stable_and_distinct() {
        let a = message_id("a/b", "x.test");
        assert_eq!(a, message_id("a/b", "x.test"));
        assert_ne!(a, message_id("a_b", "x.test"));
        assert!(a.starts_with("<a_b.") && a.ends_with("@x.test>"), "{a}");
        let long = message_id(&"é".repeat(200), "x.test");
        assert!(long.len() < 100, "{long}");
    }
}
