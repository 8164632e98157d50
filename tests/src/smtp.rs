//! An SMTP server inside the test (mailin-embedded). INTERFACE STUB: the mail
//! engineer replaces it; the signatures are the agreed interface.

use std::net::SocketAddr;
use std::time::Duration;

/// How the server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 250 to everything.
    Accept,
    /// 451 (transient) to every mail.
    TempFail,
    /// 550 (permanent) to every mail.
    PermFail,
}

/// A mail the server accepted.
#[derive(Debug, Clone)]
pub struct CapturedMail {
    /// Envelope sender.
    pub from: String,
    /// Envelope recipients.
    pub to: Vec<String>,
    /// The raw message.
    pub raw: Vec<u8>,
    /// Decoded subject.
    pub subject: String,
    /// Decoded text part.
    pub text: String,
    /// Decoded HTML part.
    pub html: String,
    /// The first `/confirm/` link in the text part.
    pub link: Option<String>,
}

/// A running SMTP server on 127.0.0.1.
#[derive(Debug)]
pub struct SmtpServer {
    /// Where it listens.
    pub addr: SocketAddr,
}

impl SmtpServer {
    /// Starts on a free port.
    pub fn start() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        }
    }

    /// `smtp+plain://127.0.0.1:PORT`, for `MAIL_URL`.
    pub fn mail_url(&self) -> String {
        format!("smtp+plain://{}", self.addr)
    }

    /// Changes how it answers from now on.
    pub fn set_mode(&self, _mode: Mode) {}

    /// Stops listening (connections refused) until [`SmtpServer::resume`].
    pub fn stop(&mut self) {}

    /// Listens again on the same port.
    pub fn resume(&mut self) {}

    /// Every mail accepted so far.
    pub fn mails(&self) -> Vec<CapturedMail> {
        Vec::new()
    }

    /// Waits until at least `n` mails were accepted, or `timeout`.
    pub async fn wait_for_mails(&self, _n: usize, _timeout: Duration) -> Vec<CapturedMail> {
        Vec::new()
    }
}
