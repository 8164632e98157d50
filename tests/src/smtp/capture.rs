//! What the server accepted: the raw mail as a session stored it, and the
//! parsed [`CapturedMail`] a test reads (parsed only when asked, so capturing
//! stays cheap for the sender).

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
    /// The `Message-ID` header, without angle brackets.
    pub message_id: Option<String>,
    /// The `To` header as written (display name and address).
    pub to_header: Option<String>,
}

impl CapturedMail {
    pub(super) fn parse(raw: &RawMail) -> Self {
        let parsed = mail_parser::MessageParser::default().parse(&raw.data);
        let (subject, text, html, message_id, to_header) = match &parsed {
            Some(m) => (
                m.subject().unwrap_or_default().to_owned(),
                m.body_text(0).map(|t| t.into_owned()).unwrap_or_default(),
                m.body_html(0).map(|t| t.into_owned()).unwrap_or_default(),
                m.message_id().map(str::to_owned),
                m.header_raw("To").map(|v| v.trim().to_owned()),
            ),
            None => Default::default(),
        };
        let link = first_confirm_link(&text);
        Self {
            from: raw.from.clone(),
            to: raw.to.clone(),
            raw: raw.data.clone(),
            subject,
            text,
            html,
            link,
            message_id,
            to_header,
        }
    }
}

/// The first whitespace-separated word of `text` holding `/confirm/`, from its `http`.
pub fn first_confirm_link(text: &str) -> Option<String> {
    let word = text.split_whitespace().find(|w| w.contains("/confirm/"))?;
    let start = word.find("http").unwrap_or(0);
    let link = word[start..].trim_end_matches(['>', ')', '"', '\'']);
    Some(link.to_owned())
}

/// The request id a mail was sent for: the worker derives the `Message-ID`
/// from it (`<{request_id}.{hash}@{domain}>`, for ids without dots).
pub fn mail_request(mail: &CapturedMail) -> String {
    mail.message_id
        .as_deref()
        .and_then(|m| m.split('.').next())
        .unwrap_or_default()
        .to_owned()
}

/// A mail as the session stored it: envelope and bytes, not parsed yet.
pub(super) struct RawMail {
    pub(super) from: String,
    pub(super) to: Vec<String>,
    pub(super) data: Vec<u8>,
}
