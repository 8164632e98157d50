//! Several mail transactions per write (RFC 2920 pipelining across
//! transactions).
//!
//! When every connection is busy, mails wait in the pool's line; the sender
//! that gets a connection next takes the waiting ones along. With `CHUNKING`
//! all of them go in one write: `MAIL`, `RCPT` and `BDAT <size> LAST` with
//! the message, for each, and every reply is read in order. A chunk states
//! its size, so the server reads each transaction to its end whatever it
//! answered before (RFC 3030, 4.2): a refusal stays with its own mail. With
//! `DATA`, whose message may only follow its 354, each write carries one
//! mail's message and the next mail's `MAIL`, `RCPT` and `DATA` (RFC 2920
//! lets the message open a group): one write per mail and one more, instead
//! of two per mail. Over a network, where each round trip costs
//! milliseconds, a busy connection carries as many mails per round trip as
//! are waiting; over loopback it saves system calls, not CPU
//! (docs/performance.md, "Mails per write").
//!
//! Every reply is read before the connection is judged, so none can be
//! taken for a later mail's. A refused transaction may still be open on the
//! server (a `DATA` refused for want of recipients leaves it so; whether a
//! refused `BDAT LAST` does is the server's choice), so the next one opens
//! with `RSET`: in a `CHUNKING` write, where no reply is known yet, every
//! transaction after the first does; with `DATA`, one that follows a
//! refusal; and a batch that ends with a refusal ends with `RSET`. The session
//! then stays in step and is kept, as Postfix's own client keeps it
//! (reconnecting after each refused address cost a TCP, and often a TLS,
//! handshake, where verification mail meets many mistyped addresses). It is
//! aborted when it broke, the server said 421 (closing) or refused an `RSET`.
//! A connection that breaks leaves the mails it had not answered
//! [`SendError::Unanswered`] (retried later, as a mail whose reply was lost
//! always is).

use std::time::Duration;

use lettre::address::Envelope as SmtpEnvelope;
use lettre::transport::smtp::client::AsyncSmtpConnection;
use lettre::transport::smtp::extension::Extension;

use super::{Verbatim, push_chunk, push_dot_stuffed};
use crate::mail::{SendError, SmtpStep};

/// Most mails in one write: bounds what one broken connection leaves
/// unanswered.
pub(super) const MAX_BATCH: usize = 16;

/// A waiting mail is taken along only if it joined the line less than this
/// long ago: its sender's deadline (the attempt's 30 s) runs from about then,
/// and a mail whose sender gave up mid-exchange may arrive and be sent again.
pub(super) const TAKE_WITHIN: Duration = Duration::from_secs(10);

/// A mail, its message as text (a batch carries UTF-8 only).
pub(super) type Outgoing<'a> = (&'a SmtpEnvelope, &'a str);

/// Whether a mail can go in a batch on `conn`: one recipient, ASCII
/// addresses (no `SMTPUTF8` to ask for), and 8-bit text only where the
/// server takes it. Ours always are; anything else goes alone.
pub(super) fn fits(conn: &AsyncSmtpConnection, envelope: &SmtpEnvelope, text: &str) -> bool {
    let ascii_addresses = envelope
        .from()
        .into_iter()
        .chain(envelope.to())
        .all(|a| AsRef::<str>::as_ref(a).is_ascii());
    envelope.to().len() == 1
        && ascii_addresses
        // The server's word first: nearly all offer 8BITMIME, and then the
        // text need not be scanned (`push_commands` scans it once anyway).
        && (conn.server_info().supports_feature(Extension::EightBitMime) || text.is_ascii())
}

/// What a batch came to.
pub(super) struct Exchanged {
    /// One per mail, in order.
    pub(super) results: Vec<Result<(), SendError>>,
    /// The session is in step and open: the connection can be reused.
    pub(super) reusable: bool,
}

/// Sends `mails` (each accepted by [`fits`]) and reads every reply, as
/// `BDAT` chunks in one write if `chunking`, else with `DATA`, each message
/// in the write of the next mail's commands. A session that broke, is
/// closing or refused to reset is aborted.
pub(super) async fn exchange(
    conn: &mut AsyncSmtpConnection,
    mails: &[Outgoing<'_>],
    chunking: bool,
) -> Exchanged {
    let mut results: Vec<Result<(), SendError>> =
        mails.iter().map(|_| Err(SendError::Unanswered)).collect();
    let mut session = Session {
        conn,
        unwritten: None,
        broken: false,
        closing: false,
        open: false,
        unsettled: false,
    };
    if chunking {
        chunked(&mut session, mails, &mut results).await;
    } else {
        with_data(&mut session, mails, &mut results).await;
    }
    if session.open && session.usable() {
        // The last transaction was refused: leave the session clean for
        // the next mail (one more round trip, after refusals only).
        session.unwritten = Some(RSET.to_owned());
        session.reset().await;
    }
    let reusable = session.usable();
    if !reusable {
        session.conn.abort().await;
    }
    Exchanged { results, reusable }
}

const RSET: &str = "RSET\r\n";

/// Every mail as a chunk, all in one write, each after the first opened
/// with `RSET`.
async fn chunked(
    session: &mut Session<'_>,
    mails: &[Outgoing<'_>],
    results: &mut [Result<(), SendError>],
) {
    let mut group = String::with_capacity(mails.iter().map(|(_, t)| t.len() + 128).sum());
    for (k, (envelope, text)) in mails.iter().enumerate() {
        if k > 0 {
            group.push_str(RSET);
        }
        push_commands(&mut group, envelope, text);
        push_chunk(&mut group, text);
    }
    session.unwritten = Some(group);
    for (k, result) in results.iter_mut().enumerate() {
        if k > 0 {
            session.reset().await;
        }
        if session.broken {
            // This mail and the ones after it stay unanswered.
            return;
        }
        let (answer, _) = session.transaction().await;
        session.open = answer.is_err();
        *result = answer;
    }
}

/// Each write: the message of the mail before (if its `DATA` got 354), then
/// this mail's `MAIL`, `RCPT` and `DATA` (after `RSET` if the one before
/// was refused); the last write, the last message.
async fn with_data(
    session: &mut Session<'_>,
    mails: &[Outgoing<'_>],
    results: &mut [Result<(), SendError>],
) {
    // The mail whose message goes first in the next write, and the message.
    let mut carried: Option<(usize, &str)> = None;
    for i in 0..=mails.len() {
        let next = mails.get(i);
        let reset = session.open && next.is_some();
        let mut group = String::with_capacity(carried.map_or(0, |(_, t)| t.len() + 16) + 256);
        if let Some((_, text)) = carried {
            push_dot_stuffed(&mut group, text);
        }
        if let Some((envelope, text)) = next {
            if reset {
                group.push_str(RSET);
            }
            push_commands(&mut group, envelope, text);
            group.push_str("DATA\r\n");
        }
        if group.is_empty() {
            return;
        }
        session.unwritten = Some(group);
        if let Some((j, _)) = carried.take() {
            // The end of the message ends the transaction, accepted or not.
            results[j] = session.reply().await.map_err(|source| SendError::Smtp {
                step: SmtpStep::Data,
                source,
            });
            session.open = false;
        }
        if reset {
            session.reset().await;
        }
        let Some(&(_, text)) = next else {
            return;
        };
        if session.broken {
            return;
        }
        let (answer, in_data) = session.transaction().await;
        match (answer, in_data) {
            (Ok(()), true) => carried = Some((i, text)),
            (answer, in_data) => {
                // A refused MAIL or RCPT with DATA still answered 354: the
                // session cannot go on without sending the message.
                session.broken |= in_data;
                session.open = answer.is_err();
                results[i] = answer;
            }
        }
        if session.broken {
            return;
        }
    }
}

/// `MAIL` (8-bit declared when the message is not ASCII) and `RCPT`, as
/// lettre's `Mail` and `Rcpt` write them (tested), without copying the
/// addresses into commands first.
fn push_commands(group: &mut String, envelope: &SmtpEnvelope, text: &str) {
    group.push_str("MAIL FROM:<");
    if let Some(from) = envelope.from() {
        group.push_str(from.as_ref());
    }
    group.push('>');
    if !text.is_ascii() {
        group.push_str(" BODY=8BITMIME");
    }
    group.push_str("\r\n");
    for to in envelope.to() {
        group.push_str("RCPT TO:<");
        group.push_str(to.as_ref());
        group.push_str(">\r\n");
    }
}

/// The replies to what was written, read in order; the first read writes
/// what is waiting to be written.
struct Session<'c> {
    conn: &'c mut AsyncSmtpConnection,
    unwritten: Option<String>,
    /// No reply code came: the connection broke or spoke nonsense, and
    /// nothing after it can be read.
    broken: bool,
    /// The server said 421: it is closing the session.
    closing: bool,
    /// The last transaction was refused and may still be open.
    open: bool,
    /// An `RSET` was refused: the session's state is unknown.
    unsettled: bool,
}

impl Session<'_> {
    fn usable(&self) -> bool {
        !self.broken && !self.closing && !self.unsettled
    }

    async fn reply(&mut self) -> Result<(), lettre::transport::smtp::Error> {
        let reply = match self.unwritten.take() {
            Some(group) => self.conn.command(Verbatim(&group)).await,
            None => self.conn.read_response().await,
        };
        if let Err(e) = &reply {
            self.broken |= e.status().is_none();
            self.closing |= e.status().map(u16::from) == Some(421);
        }
        reply.map(drop)
    }

    /// The reply to an `RSET`.
    async fn reset(&mut self) {
        if self.reply().await.is_err() {
            self.unsettled = true;
        } else {
            self.open = false;
        }
    }

    /// The replies to one transaction's `MAIL`, `RCPT` and `DATA` (or its
    /// chunk): the first refusal, if any, and whether the last was positive
    /// (DATA's 354: the server now waits for the message).
    async fn transaction(&mut self) -> (Result<(), SendError>, bool) {
        let mut result = Ok(());
        let mut last_positive = false;
        for step in [SmtpStep::Mail, SmtpStep::Rcpt, SmtpStep::Data] {
            match self.reply().await {
                Ok(()) => last_positive = step == SmtpStep::Data,
                Err(source) => {
                    if result.is_ok() {
                        result = Err(SendError::Smtp { step, source });
                    }
                    if self.broken {
                        break;
                    }
                }
            }
        }
        (result, last_positive)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lettre::transport::smtp::commands::{Mail, Rcpt};
    use lettre::transport::smtp::extension::{MailBodyParameter, MailParameter};

    #[test]
    fn commands_are_written_as_lettre_writes_them() -> Result<(), Box<dyn std::error::Error>> {
        let from = "noreply@example.com".parse()?;
        let to = "alice+tag@example.org".parse()?;
        for (envelope, text) in [
            (SmtpEnvelope::new(Some(from), vec![to])?, "ascii"),
            (
                SmtpEnvelope::new(None, vec!["bob@example.net".parse()?])?,
                "8-bit: 确认",
            ),
        ] {
            let parameters = if text.is_ascii() {
                Vec::new()
            } else {
                vec![MailParameter::Body(MailBodyParameter::EightBitMime)]
            };
            let mut expected = Mail::new(envelope.from().cloned(), parameters).to_string();
            for to in envelope.to() {
                expected.push_str(&Rcpt::new(to.clone(), Vec::new()).to_string());
            }
            let mut group = String::new();
            push_commands(&mut group, &envelope, text);
            assert_eq!(group, expected);
        }
        Ok(())
    }
}
