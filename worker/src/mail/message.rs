//! Building the MIME message every transport sends: the same bytes whether
//! they go over SMTP, into the outbox, or to an HTTP API that takes raw MIME.

use std::time::SystemTime;

use lettre::Address;
use lettre::address::Envelope as SmtpEnvelope;
use lettre::message::header::{self, Headers};
use lettre::message::{Mailbox, Mailboxes};
use verimail_shared::config::Config;

use super::date;
use super::headers::{put, write_subject, write_to};
use super::mime::write_part;
use super::{Envelope, MailerError, RenderedMail, SendError};

/// Builds messages from `MAIL_FROM`.
#[derive(Debug, Clone)]
pub struct Composer {
    /// The sender (`MAIL_FROM`).
    pub(super) from: Mailbox,
    /// The `From` header line, encoded once: it is the same in every mail.
    from_line: String,
    /// Right-hand side of our `Message-ID`s: the sender's domain.
    id_domain: String,
}

/// A message ready for every transport.
#[derive(Debug)]
pub struct Composed {
    /// `MAIL FROM` and `RCPT TO`.
    pub envelope: SmtpEnvelope,
    /// The recipient's address, parsed.
    pub to: Address,
    /// The whole RFC 5322 message, CRLF line ends, not dot-stuffed.
    pub bytes: Vec<u8>,
    /// Its `Message-ID` (with the angle brackets).
    pub message_id: String,
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
        let mut headers = Headers::new();
        headers.set(header::From::from(Mailboxes::from(from.clone())));
        Ok(Self {
            from_line: headers.to_string(),
            from,
            id_domain,
        })
    }

    /// The `Message-ID` of the request's mail (the same on every attempt).
    pub fn message_id(&self, request_id: &str) -> String {
        message_id(request_id, &self.id_domain)
    }

    /// The MIME message: multipart/alternative (text, HTML), with a
    /// `Message-ID` derived from the request id.
    pub fn build(&self, to: &Envelope<'_>, mail: &RenderedMail) -> Result<Composed, SendError> {
        let address: Address = to.to_email.parse().map_err(SendError::Address)?;
        let envelope = SmtpEnvelope::new(Some(self.from.email.clone()), vec![address.clone()])
            .map_err(SendError::Message)?;
        let name = to.to_name.map(str::trim).filter(|n| !n.is_empty());
        let message_id = self.message_id(to.request_id);
        // The boundary starts with `=_`, which quoted-printable and base64
        // never write and a 7bit part is never chosen to contain; the same
        // request gets the same bytes on every attempt.
        let mut boundary = String::from("=_vm.");
        push_hex(&mut boundary, fnv1a(to.request_id));
        // Room for the headers and for either part base64-encoded (4/3, plus
        // line breaks), so the message is never copied into a larger buffer.
        let mut bytes = Vec::with_capacity(
            512 + (mail.text.len() + mail.html.len()) * 7 / 5 + 2 * boundary.len(),
        );
        bytes.extend_from_slice(self.from_line.as_bytes());
        // Quoted or RFC 2047-encoded where needed, and folded: a name cannot
        // add a header or an address.
        write_to(&mut bytes, name, &address);
        write_subject(&mut bytes, &mail.subject);
        bytes.extend_from_slice(b"Date: ");
        bytes.extend_from_slice(&date::rfc5322(SystemTime::now()));
        let b = boundary.as_str();
        put(
            &mut bytes,
            &["\r\nMessage-ID: ", &message_id, "\r\nMIME-Version: 1.0\r\n"],
        );
        put(
            &mut bytes,
            &[
                "Content-Type: multipart/alternative;\r\n boundary=\"",
                b,
                "\"\r\n\r\n",
            ],
        );
        put(&mut bytes, &["--", b, "\r\n"]);
        write_part(&mut bytes, "text/plain; charset=utf-8", &mail.text);
        put(&mut bytes, &["--", b, "\r\n"]);
        write_part(&mut bytes, "text/html; charset=utf-8", &mail.html);
        put(&mut bytes, &["--", b, "--\r\n"]);
        Ok(Composed {
            envelope,
            to: address,
            bytes,
            message_id,
        })
    }
}

/// `<{request id, sanitized}.{hash of the raw id}@{domain}>`: the same request
/// always gives the same id (downstream can spot a duplicate), and the hash
/// keeps ids apart that sanitizing would merge.
fn message_id(request_id: &str, domain: &str) -> String {
    let mut id = String::with_capacity(request_id.len().min(64) + domain.len() + 20);
    id.push('<');
    id.extend(request_id.chars().take(64).map(|c| {
        if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
            c
        } else {
            '_'
        }
    }));
    // No dot at either end of the sanitized id.
    let kept = id.trim_end_matches('.').len();
    id.truncate(kept);
    let leading = id[1..].len() - id[1..].trim_start_matches('.').len();
    id.drain(1..1 + leading);
    id.push('.');
    push_hex(&mut id, fnv1a(request_id));
    id.push('@');
    id.push_str(domain);
    id.push('>');
    id
}

/// `n` as 16 lowercase hex digits (`{:016x}` without the formatting machinery).
fn push_hex(out: &mut String, n: u64) {
    // Into a stack buffer and pushed as one string: `format!` or a char at a
    // time cost several times as much. Sixteen digits always fit eight bytes.
    let mut digits = [0; 16];
    if hex::encode_to_slice(n.to_be_bytes(), &mut digits).is_ok()
        && let Ok(digits) = std::str::from_utf8(&digits)
    {
        out.push_str(digits);
    }
}

/// FNV-1a: stable across Rust versions and platforms, unlike std's hasher.
pub(super) fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
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

    #[test]
    fn message_ids_are_the_formatted_ones() {
        let ids = [
            "5f1c-req/1",
            "..a..",
            "...",
            "",
            "a.b.",
            ".x",
            "ü.ä",
            "x y\r\nz",
        ];
        let long = "é.".repeat(50);
        for id in ids.into_iter().chain([long.as_str()]) {
            let clean: String = id
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
            let want = format!("<{}.{:016x}@x.test>", clean.trim_matches('.'), fnv1a(id));
            assert_eq!(message_id(id, "x.test"), want, "{id:?}");
        }
    }
}
