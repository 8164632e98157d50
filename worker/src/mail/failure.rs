//! What a failed delivery means: [`SendError`] says what went wrong, and
//! [`classify`] is the one function that says what that means for the request.
//!
//! # Classification
//!
//! From the step that failed and the reply's enhanced status code (RFC 3463):
//!
//! - a refusal of the recipient itself (5.1.x, or 550/551/553 to `RCPT TO`
//!   without an enhanced code), or an address no server can take:
//!   `recipient_rejected`, at once;
//! - a 5xx to `MAIL FROM` (the sender), to `AUTH` (our credentials), a 5.7.x
//!   anywhere (relaying denied, policy) or a 5xx to the message: the server
//!   refuses *us*, and the recipient may be fine. Sending again cannot pass
//!   until an operator fixes the configuration, so the request ends
//!   `delivery_failed` at once and its copy is dead-lettered for replay; the
//!   detail says which ("sender refused: ...");
//! - everything else (4xx, refused or reset connections, timeouts, TLS, a
//!   refused greeting or EHLO, file-system errors of the outbox) is transient.
//!
//! An HTTP API's answer is judged by its status: 429 and 5xx are transient,
//! as are timeouts and refused connections; any other 4xx is
//! `provider_rejected` (its error in the detail), unless the provider names
//! the recipient as invalid or inactive: `recipient_rejected`.
//!
//! [`pause_for`] says when a failure asks the whole namespace to slow down
//! that target: a `Retry-After` (or a 429 without one), an SMTP 421 or 454.

use std::time::Duration;

use lettre::address::AddressError;

use super::{Classification, Refusal};

/// A delivery failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Opening the connection failed at the TCP level (refused, unreachable, reset).
    #[error("cannot connect to the SMTP server: {0}")]
    Connect(#[source] std::io::Error),
    /// The server refused or broke the session before the mail transaction:
    /// greeting, EHLO, STARTTLS or TLS handshake.
    #[error("SMTP session set-up failed: {0}")]
    Session(#[source] lettre::transport::smtp::Error),
    /// The server refused our credentials (or broke the session during `AUTH`).
    #[error("SMTP AUTH: {0}")]
    Auth(#[source] lettre::transport::smtp::Error),
    /// The mail transaction failed: a 4xx/5xx reply to MAIL, RCPT or DATA, or
    /// the connection broke during it.
    #[error("SMTP {step}: {source}")]
    Smtp {
        /// The step that failed.
        step: SmtpStep,
        /// lettre's error (the reply's code and text).
        #[source]
        source: lettre::transport::smtp::Error,
    },
    /// The recipient address needs SMTPUTF8, which the server does not offer.
    #[error("the SMTP server cannot take this non-ASCII address: {0}")]
    Utf8Address(#[source] lettre::transport::smtp::Error),
    /// No complete exchange within the deadline.
    #[error("no answer from the SMTP server within {} s", .0.as_secs())]
    Timeout(Duration),
    /// The mail went out in one write with others, and the exchange ended
    /// (the connection broke, or its sender's deadline passed) before the
    /// server answered it: it may or may not have arrived.
    #[error("the SMTP exchange carrying this mail ended before the server answered it")]
    Unanswered,
    /// Writing to the `file://` outbox failed.
    #[error("writing the mail file failed: {0}")]
    File(#[source] std::io::Error),
    /// The recipient address is not one lettre can send to.
    #[error("the recipient address is unusable: {0}")]
    Address(#[source] AddressError),
    /// The message could not be built.
    #[error("the message could not be built: {0}")]
    Message(#[source] lettre::error::Error),
    /// An HTTP API could not be reached, or broke off, or did not answer in time.
    #[error("{provider}: no answer: {source}")]
    HttpTransport {
        /// The provider (`ses`, `postmark`, ...).
        provider: &'static str,
        /// reqwest's error.
        #[source]
        source: reqwest::Error,
    },
    /// An HTTP API answered with an error status.
    #[error("{provider} answered {status}: {detail}")]
    HttpStatus {
        /// The provider.
        provider: &'static str,
        /// The HTTP status.
        status: u16,
        /// The provider's error, in its words.
        detail: String,
        /// The provider named the recipient as invalid or inactive.
        recipient: bool,
        /// How long it asked us to wait (`Retry-After`, SendGrid's `X-RateLimit-Reset`).
        retry_after: Option<Duration>,
    },
    /// A 2xx that is not the provider's answer to a send (no message id
    /// where one must be: a wrong endpoint).
    #[error("{provider} answered {status} without a message id: {body}")]
    HttpUnexpected {
        /// The provider.
        provider: &'static str,
        /// The HTTP status.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// The request could not be signed (SES: no AWS credentials).
    #[error("{provider}: the request could not be signed: {source}")]
    Signing {
        /// The provider.
        provider: &'static str,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Every target is paused by a `Retry-After` or an SMTP 421/454 for
    /// longer than this send may wait.
    #[error("every target asked us to wait (paused for another {} ms)", .0.as_millis())]
    Paused(Duration),
}

/// Without a time given, a pause lasts this long (the contract's 5 s).
pub const DEFAULT_PAUSE: Duration = Duration::from_secs(5);

/// How long `error` asks every worker of the namespace to leave its target
/// alone, if it does: an API's `Retry-After` (or a 429 without one), an SMTP
/// 421 ("service not available, closing") or 454 ("TLS not available" in
/// RFC 3207, and SES's "Throttling").
pub fn pause_for(error: &SendError) -> Option<Duration> {
    match error {
        SendError::HttpStatus {
            retry_after: Some(d),
            ..
        } => Some(*d),
        SendError::HttpStatus {
            status: 429,
            retry_after: None,
            ..
        } => Some(DEFAULT_PAUSE),
        SendError::Smtp { source, .. } | SendError::Session(source) | SendError::Auth(source) => {
            match reply(source) {
                Some((421 | 454, _)) => Some(DEFAULT_PAUSE),
                _ => None,
            }
        }
        _ => None,
    }
}

/// A step of the mail transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpStep {
    /// `MAIL FROM`.
    Mail,
    /// `RCPT TO`.
    Rcpt,
    /// `DATA` and the message.
    Data,
}

impl std::fmt::Display for SmtpStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Mail => "MAIL FROM",
            Self::Rcpt => "RCPT TO",
            Self::Data => "DATA",
        })
    }
}

impl SendError {
    /// What the failure means ([`classify`]).
    pub fn classification(&self) -> Classification {
        classify(self)
    }

    /// The outcome's `detail`: the error, opened by what was refused when the
    /// server refused us ("sender refused: SMTP MAIL FROM: ...").
    pub fn detail(&self) -> String {
        match classify(self) {
            Classification::Refused(r) => format!("{}: {self}", r.as_str()),
            Classification::Transient
            | Classification::RecipientRejected
            | Classification::ProviderRejected => self.to_string(),
        }
    }
}

/// What `error` means for the request: retry, `recipient_rejected`, or
/// `delivery_failed` at once (see the module docs). The one place deciding it.
pub fn classify(error: &SendError) -> Classification {
    match error {
        SendError::Smtp { step, source } => match reply(source) {
            Some((code, text)) if code >= 500 => refusal(*step, code, &text),
            // 4xx, or the connection broke mid-transaction.
            _ => Classification::Transient,
        },
        SendError::Auth(e) => match reply(e) {
            Some((code, _)) if code >= 500 => Classification::Refused(Refusal::Authentication),
            _ => Classification::Transient,
        },
        // These will fail the same way on every attempt, for this address.
        SendError::Utf8Address(_) | SendError::Address(_) | SendError::Message(_) => {
            Classification::RecipientRejected
        }
        // The server (or our disk) is unwell, or will not talk to us at all:
        // an operator can fix it, and the request is replayable from the
        // dead-letter queue once the window ends.
        SendError::Connect(_)
        | SendError::Session(_)
        | SendError::Timeout(_)
        | SendError::Unanswered
        | SendError::File(_)
        | SendError::HttpTransport { .. }
        | SendError::Paused(_) => Classification::Transient,
        SendError::HttpStatus {
            status, recipient, ..
        } => match status {
            429 | 500.. => Classification::Transient,
            _ if *recipient => Classification::RecipientRejected,
            _ => Classification::ProviderRejected,
        },
        // A wrong endpoint or missing credentials: the operator must act,
        // and the request is replayable once they have.
        SendError::HttpUnexpected { .. } | SendError::Signing { .. } => {
            Classification::Refused(Refusal::Other)
        }
    }
}

/// A 5xx `code` with `text` (which may open with an enhanced status code,
/// `5.1.1`) in answer to `step`.
fn refusal(step: SmtpStep, code: u16, text: &str) -> Classification {
    // The enhanced code's subject: 1 addressing, 2 mailbox, 3 mail system,
    // 4 network, 5 protocol, 6 content, 7 security and policy.
    let subject = text.split_whitespace().next().and_then(|word| {
        let mut parts = word.split('.');
        let class = parts.next()?;
        let subject: u16 = parts.next()?.parse().ok()?;
        let detail = parts.next()?;
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        (class == "5" && digits(detail) && parts.next().is_none()).then_some(subject)
    });
    match (step, subject) {
        (SmtpStep::Mail, _) => Classification::Refused(Refusal::Sender),
        (_, Some(7)) => Classification::Refused(Refusal::Policy),
        (SmtpStep::Rcpt | SmtpStep::Data, Some(1)) => Classification::RecipientRejected,
        (SmtpStep::Rcpt, None) if matches!(code, 550 | 551 | 553) => {
            Classification::RecipientRejected
        }
        (SmtpStep::Rcpt, _) => Classification::Refused(Refusal::Other),
        (SmtpStep::Data, _) => Classification::Refused(Refusal::Message),
    }
}

/// The code and text of the server's negative reply behind `e`, if any.
fn reply(e: &lettre::transport::smtp::Error) -> Option<(u16, String)> {
    let code = u16::from(e.status()?);
    let text = std::error::Error::source(e)
        .map(ToString::to_string)
        .unwrap_or_default();
    Some((code, text))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::mail::test_support::{TestResult, closed_port, envelope, mail, mailer};
    use verimail_tests::smtp::{Mode, SmtpServer};

    #[tokio::test]
    async fn replies_4xx_are_transient_and_5xx_permanent() -> TestResult {
        let server = SmtpServer::start();
        let m = mailer(&server.mail_url())?;
        let to = envelope(None, "bob@example.com");

        server.set_mode(Mode::TempFail);
        let err = m.send(&to, &mail()).await.err().ok_or("451 expected")?;
        assert!(matches!(err, SendError::Smtp { .. }), "{err:?}");
        assert_eq!(err.classification(), Classification::Transient, "{err}");

        server.set_mode(Mode::PermFail);
        let err = m.send(&to, &mail()).await.err().ok_or("550 expected")?;
        assert_eq!(
            err.classification(),
            Classification::RecipientRejected,
            "{err}"
        );
        assert!(err.to_string().contains("550"), "{err}");

        server.set_mode(Mode::Accept);
        m.send(&to, &mail()).await?;
        Ok(())
    }

    #[tokio::test]
    async fn refusals_are_classified_by_step_and_enhanced_code() -> TestResult {
        use verimail_tests::smtp::Step;
        let server = SmtpServer::start();
        let to = envelope(None, "bob@example.com");
        let cases = [
            (
                Step::Rcpt,
                550,
                "5.1.1 No such user",
                Classification::RecipientRejected,
                "",
            ),
            (
                Step::Rcpt,
                550,
                "No such user",
                Classification::RecipientRejected,
                "",
            ),
            (
                Step::Rcpt,
                550,
                "5.7.1 Relaying denied",
                Classification::Refused(Refusal::Policy),
                "policy refused: SMTP RCPT TO: ",
            ),
            (
                Step::Mail,
                553,
                "5.1.8 Sender address rejected",
                Classification::Refused(Refusal::Sender),
                "sender refused: SMTP MAIL FROM: ",
            ),
            (
                Step::Rcpt,
                451,
                "4.7.1 Greylisted",
                Classification::Transient,
                "",
            ),
        ];
        let m = mailer(&server.mail_url())?;
        for (step, code, text, expected, detail) in cases {
            server.clear_refusals();
            server.refuse(step, code, text);
            let err = m
                .send(&to, &mail())
                .await
                .err()
                .ok_or("a refusal expected")?;
            assert_eq!(
                err.classification(),
                expected,
                "{step:?} {code} {text}: {err}"
            );
            assert!(err.detail().starts_with(detail), "{}", err.detail());
            assert!(err.detail().contains(text), "{}", err.detail());
        }

        server.clear_refusals();
        server.refuse(Step::Auth, 535, "5.7.8 Authentication credentials invalid");
        let port = server.port();
        let m = mailer(&format!("smtp+plain://user:secret@127.0.0.1:{port}"))?;
        let err = m.send(&to, &mail()).await.err().ok_or("535 expected")?;
        assert_eq!(
            err.classification(),
            Classification::Refused(Refusal::Authentication),
            "{err}"
        );
        assert!(
            err.detail().starts_with("authentication refused: "),
            "{}",
            err.detail()
        );
        assert_eq!(server.count(), 0);
        Ok(())
    }

    #[tokio::test]
    async fn smtp_421_and_454_ask_for_a_pause_and_other_replies_do_not() -> TestResult {
        use verimail_tests::smtp::Step;
        let server = SmtpServer::start();
        let to = envelope(None, "bob@example.com");
        for (code, text, pause) in [
            (
                454,
                "4.7.0 Throttling failure: Maximum sending rate exceeded.",
                Some(DEFAULT_PAUSE),
            ),
            (421, "4.4.2 closing, slow down", Some(DEFAULT_PAUSE)),
            (451, "4.3.0 try again later", None),
            (550, "5.1.1 no such user", None),
        ] {
            server.clear_refusals();
            server.refuse(Step::Rcpt, code, text);
            // A mailer each: a pause holds its target for the next send.
            let m = mailer(&server.mail_url())?;
            let err = m
                .send(&to, &mail())
                .await
                .err()
                .ok_or("a refusal expected")?;
            assert_eq!(pause_for(&err), pause, "{code}: {err}");
            if pause.is_some() {
                let err = m.send(&to, &mail()).await.err().ok_or("paused")?;
                assert!(matches!(err, SendError::Paused(_)), "{err:?}");
            }
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_refused_connection_is_transient() -> TestResult {
        let m = mailer(&format!("smtp+plain://127.0.0.1:{}", closed_port()?))?;
        let err = m
            .send(&envelope(None, "bob@example.com"), &mail())
            .await
            .err()
            .ok_or("refused expected")?;
        assert!(matches!(err, SendError::Connect(_)), "{err:?}");
        assert_eq!(err.classification(), Classification::Transient);
        Ok(())
    }

    #[tokio::test]
    async fn a_failed_tls_handshake_is_transient() -> TestResult {
        // The test server speaks plain SMTP: implicit TLS fails in the handshake.
        let server = SmtpServer::start();
        let m = mailer(&format!("smtps://127.0.0.1:{}", server.port()))?;
        let err = m
            .send(&envelope(None, "bob@example.com"), &mail())
            .await
            .err()
            .ok_or("TLS failure expected")?;
        assert!(matches!(err, SendError::Session(_)), "{err:?}");
        assert_eq!(err.classification(), Classification::Transient);
        Ok(())
    }

    #[tokio::test]
    async fn a_hanging_server_times_out_and_is_transient() -> TestResult {
        let server = SmtpServer::start();
        server.set_hang(true);
        let m = mailer(&server.mail_url())?.with_attempt_timeout(Duration::from_millis(300));
        let started = Instant::now();
        let err = m
            .send(&envelope(None, "bob@example.com"), &mail())
            .await
            .err()
            .ok_or("timeout expected")?;
        assert!(matches!(err, SendError::Timeout(_)), "{err:?}");
        assert_eq!(err.classification(), Classification::Transient);
        assert!(started.elapsed() < Duration::from_secs(3));
        server.set_hang(false);
        // The timed-out connection was dropped, not pooled: the next send is clean.
        m.send(&envelope(None, "bob@example.com"), &mail()).await?;
        assert_eq!(
            server.wait_for_mails(1, Duration::from_secs(5)).await.len(),
            1
        );
        Ok(())
    }

    #[tokio::test]
    async fn an_address_the_server_cannot_take_is_permanent() -> TestResult {
        // The test server offers no SMTPUTF8.
        let server = SmtpServer::start();
        let m = mailer(&server.mail_url())?;
        let err = m
            .send(&envelope(None, "josé@example.com"), &mail())
            .await
            .err()
            .ok_or("refusal expected")?;
        assert!(matches!(err, SendError::Utf8Address(_)), "{err:?}");
        assert_eq!(err.classification(), Classification::RecipientRejected);
        let err = m
            .send(&envelope(None, "not an address"), &mail())
            .await
            .err()
            .ok_or("bad address")?;
        assert_eq!(
            err.classification(),
            Classification::RecipientRejected,
            "{err}"
        );
        Ok(())
    }
}
