//! Delivering a built message over SMTP: our own connection pool, one mail
//! transaction per send, pipelined when the server offers it.
//!
//! # Why our own connection pool
//!
//! lettre's async SMTP transport applies its timeout to the TCP connect only: a
//! server that accepts and then stops answering blocks a send forever. So
//! every attempt here runs under a deadline ([`ATTEMPT_TIMEOUT`]). Cancelling a
//! send of lettre's pooled transport would hand the half-used connection back
//! to its pool (its `PooledConnection` recycles on drop), and the next mail on
//! it would read the late reply meant for the previous command: a `250` could
//! be taken for the acceptance of the wrong mail. Our pool holds lettre's own
//! [`AsyncSmtpConnection`]s; a connection is returned to it only after a
//! complete, successful exchange, and a timed-out attempt drops its
//! connection with the future. Sockets are opened with `TCP_NODELAY`, as
//! a write that follows another before its reply (lettre's own `message`
//! writes the message and its final `.` apart) would wait for a delayed ACK
//! under Nagle's algorithm (about 40 ms per mail). `smtps://` connections
//! are opened by lettre and keep Nagle.
//!
//! # Pipelining
//!
//! When the server offers `PIPELINING` (RFC 2920; Postfix and most MTAs do),
//! `MAIL FROM`, `RCPT TO` and `DATA` go out in one write and their replies
//! are read in order, then the message, dot-stuffed and terminated in
//! one write: two round trips per mail instead of four, which halves
//! the time a mail holds its connection and the system calls on both ends.
//! Replies are read and judged exactly as lettre's own
//! `send` does (its `read_response`: a negative reply is an error with the
//! same classification, and the connection is aborted, never reused), so a
//! refusal at any step means what it meant before. Servers without it get the
//! same commands one at a time, as lettre's `send` writes them.
//!
//! # Chunking
//!
//! When the server offers `CHUNKING` too (RFC 3030; Postfix since 3.4,
//! Exchange and Gmail do), the message goes as `BDAT <size> LAST` right
//! behind `MAIL` and `RCPT`, in the same write: one round trip per mail, no
//! dot-stuffing. BDAT states its length, so the server reads the chunk
//! whatever it answered before (RFC 3030, 4.2): a refused recipient can
//! never make message lines be read as commands, which is why `DATA`'s
//! content must wait for its `354` and a chunk need not.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use lettre::address::Envelope as SmtpEnvelope;
use lettre::transport::smtp::authentication::{Credentials, DEFAULT_MECHANISMS};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::commands::{Data, Ehlo, Mail, Rcpt};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use secrecy::{ExposeSecret, SecretString};
use tokio::net::TcpStream;
use verimail_shared::config::SmtpSecurity;

use super::{MailerError, SendError, SmtpStep};

mod batch;
mod line;

use line::{Entry, Line, Taken, Turn};

/// Longest the TCP (and TLS) connection may take to open.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most SMTP connections open at once (also capped by `WORKER_CONCURRENCY`);
/// servers limit connections per client (Postfix: 50 by default).
pub const MAX_CONNECTIONS: usize = 32;
/// A connection idle longer than this is checked with `NOOP` before reuse.
const CHECK_IDLE_AFTER: Duration = Duration::from_secs(2);
/// A connection idle longer than this is closed rather than reused (servers
/// drop idle clients after a few minutes anyway).
const MAX_IDLE: Duration = Duration::from_secs(60);

/// A small pool of SMTP connections (see the module docs for why not lettre's).
pub(super) struct SmtpPool {
    host: String,
    port: u16,
    security: SmtpSecurity,
    tls: Option<TlsParameters>,
    credentials: Option<Credentials>,
    hello: ClientId,
    /// Caps the connections in use at once; mails wait in it for one.
    line: Line,
    /// The server may pipeline (it offered `PIPELINING` on the last
    /// connection opened, or none is open yet): a waiting mail may be carried
    /// by another sender, so its copy is worth making.
    pipelining: AtomicBool,
    max_idle: usize,
    /// Connections that completed their last exchange cleanly, newest last.
    idle: Mutex<Vec<Idle>>,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// An open session and what its server offered.
struct Conn {
    /// Boxed: the connection is over a kilobyte, and every mail moves it out of
    /// the idle list, through its send's future and back.
    smtp: Box<AsyncSmtpConnection>,
    /// What the server announced in its reply to our `EHLO`.
    offers: Offers,
}

/// The EHLO keywords this module acts on (lettre keeps neither).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Offers {
    /// `PIPELINING` (RFC 2920).
    pipelining: bool,
    /// `CHUNKING` (RFC 3030), used only with `PIPELINING`.
    chunking: bool,
}

impl Offers {
    /// Reads the keywords from the lines of an EHLO reply.
    fn from_ehlo<'a>(lines: impl Iterator<Item = &'a str>) -> Self {
        let mut offers = Self::default();
        for line in lines {
            let keyword = line.split_whitespace().next().unwrap_or("");
            offers.pipelining |= keyword.eq_ignore_ascii_case("PIPELINING");
            offers.chunking |= keyword.eq_ignore_ascii_case("CHUNKING");
        }
        offers
    }
}

impl std::fmt::Debug for SmtpPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpPool")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("security", &self.security)
            .field("max_idle", &self.max_idle)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded Vec is never left half-updated, so a poisoned lock is still usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SmtpPool {
    /// A pool for `host:port` of at most `size` connections (capped at [`MAX_CONNECTIONS`]).
    pub(super) fn new(
        security: SmtpSecurity,
        host: &str,
        port: u16,
        credentials: Option<&(String, SecretString)>,
        size: usize,
    ) -> Result<Self, MailerError> {
        let tls = match security {
            SmtpSecurity::None => None,
            SmtpSecurity::Opportunistic | SmtpSecurity::Implicit => Some(
                TlsParameters::new(host.to_owned()).map_err(|source| MailerError::Tls {
                    host: host.to_owned(),
                    source,
                })?,
            ),
        };
        let size = size.clamp(1, MAX_CONNECTIONS);
        Ok(Self {
            host: host.to_owned(),
            port,
            security,
            tls,
            credentials: credentials.map(|(user, pass)| {
                Credentials::new(user.clone(), pass.expose_secret().to_owned())
            }),
            hello: ClientId::default(),
            line: Line::new(size),
            pipelining: AtomicBool::new(true),
            max_idle: size,
            idle: Mutex::new(Vec::with_capacity(size)),
        })
    }

    /// Sends `bytes` to `envelope`'s recipients on a pooled connection, or
    /// has them sent by the sender that gets one next, with its own mail
    /// (`batch`), when the server pipelines.
    pub(super) async fn send(
        &self,
        envelope: &SmtpEnvelope,
        bytes: &[u8],
    ) -> Result<(), SendError> {
        // Checked once: a batch carries text only.
        let text = std::str::from_utf8(bytes).ok();
        let copy = text
            .filter(|_| self.pipelining.load(Ordering::Relaxed))
            .map(|text| (envelope, text));
        let _slot = match self.line.enter(copy) {
            Entry::Lead(slot) => slot,
            Entry::Wait(waiter) => match waiter.turn().await {
                Turn::Sent(result) => return result,
                Turn::Lead(slot) => slot,
            },
        };
        let conn = self.checkout().await?;
        if conn.offers.pipelining
            && let Some(text) = text
            && batch::fits(&conn.smtp, envelope, text)
        {
            let fits =
                |envelope: &SmtpEnvelope, text: &str| batch::fits(&conn.smtp, envelope, text);
            let others = self
                .line
                .take(batch::MAX_BATCH - 1, batch::TAKE_WITHIN, fits);
            return self.send_batch(conn, (envelope, text), others).await;
        }
        self.send_one(conn, envelope, bytes).await
    }

    /// `own` and the mails taken from the line in one write; each of those
    /// gets its result, and `own`'s is returned.
    async fn send_batch(
        &self,
        mut conn: Conn,
        own: batch::Outgoing<'_>,
        others: Vec<Taken>,
    ) -> Result<(), SendError> {
        let mails: Vec<batch::Outgoing<'_>> = std::iter::once(own)
            .chain(others.iter().map(|t| (&t.envelope, t.text.as_str())))
            .collect();
        let exchanged = batch::exchange(&mut conn.smtp, &mails, conn.offers.chunking).await;
        drop(mails);
        let mut results = exchanged.results.into_iter();
        let own = results.next().unwrap_or(Err(SendError::Unanswered));
        for (taken, result) in others.into_iter().zip(results) {
            taken.answer(result);
        }
        if exchanged.reusable {
            self.checkin(conn);
        }
        own
    }

    /// One mail on `conn`, alone.
    async fn send_one(
        &self,
        mut conn: Conn,
        envelope: &SmtpEnvelope,
        bytes: &[u8],
    ) -> Result<(), SendError> {
        let ascii = envelope
            .from()
            .into_iter()
            .chain(envelope.to())
            .all(|a| AsRef::<str>::as_ref(a).is_ascii());
        let sent = if ascii
            || conn
                .smtp
                .server_info()
                .supports_feature(Extension::SmtpUtfEight)
        {
            transaction(&mut conn.smtp, envelope, bytes, conn.offers, ascii).await
        } else {
            // lettre refuses it with its own client error, before any command.
            let refused = conn.smtp.send(envelope, bytes).await.map(drop);
            refused.map_err(|e| (SmtpStep::Mail, e))
        };
        match sent {
            Ok(()) => {
                self.checkin(conn);
                Ok(())
            }
            Err((step, e)) => {
                // The connection was aborted after a negative reply or an I/O
                // error; lettre's client-side refusals leave it usable.
                let utf8 = e.is_client() && !ascii;
                if !conn.smtp.has_broken() {
                    self.checkin(conn);
                }
                Err(if utf8 {
                    SendError::Utf8Address(e)
                } else {
                    SendError::Smtp { step, source: e }
                })
            }
        }
    }

    /// The newest idle connection that still answers, or a new one.
    async fn checkout(&self) -> Result<Conn, SendError> {
        loop {
            let idle = lock(&self.idle).pop();
            let Some(Idle { mut conn, since }) = idle else {
                // Boxed: opening a session (lettre's connect, TLS, EHLO, AUTH)
                // is a state machine of kilobytes, once per connection; inline,
                // it made every send's future that large, copied whole at each
                // move of every mail (memcpy in the profile).
                return Box::pin(self.connect()).await;
            };
            let idle_for = since.elapsed();
            if idle_for > MAX_IDLE {
                retire(conn.smtp);
                continue;
            }
            // Skipped for connections just used: at thousands of mails per second
            // the NOOP round trip would cost a quarter of the exchange.
            if idle_for > CHECK_IDLE_AFTER && !conn.smtp.test_connected().await {
                continue;
            }
            return Ok(conn);
        }
    }

    fn checkin(&self, conn: Conn) {
        let mut idle = lock(&self.idle);
        if idle.len() < self.max_idle {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        } else {
            drop(idle);
            retire(conn.smtp);
        }
    }

    async fn connect(&self) -> Result<Conn, SendError> {
        let address = (self.host.as_str(), self.port);
        let mut conn = match self.security {
            SmtpSecurity::Implicit => AsyncSmtpConnection::connect_tokio1(
                address,
                Some(CONNECT_TIMEOUT),
                &self.hello,
                self.tls.clone(),
                None,
            )
            .await
            .map_err(SendError::Session)?,
            SmtpSecurity::Opportunistic | SmtpSecurity::None => {
                let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
                    .await
                    .map_err(|_| SendError::Timeout(CONNECT_TIMEOUT))?
                    .map_err(SendError::Connect)?;
                tcp.set_nodelay(true).map_err(SendError::Connect)?;
                let mut conn =
                    AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &self.hello)
                        .await
                        .map_err(SendError::Session)?;
                if let Some(tls) = &self.tls
                    && conn.can_starttls()
                {
                    conn.starttls(tls.clone(), &self.hello)
                        .await
                        .map_err(SendError::Session)?;
                }
                conn
            }
        };
        // lettre keeps only the extensions it uses from the EHLO reply, so we
        // ask once more (before AUTH, where EHLO is always allowed) to learn
        // whether the server pipelines and takes chunks: one round trip per
        // connection.
        let offered = conn
            .command(Ehlo::new(self.hello.clone()))
            .await
            .map_err(SendError::Session)?;
        let offers = Offers::from_ehlo(offered.message());
        self.pipelining.store(offers.pipelining, Ordering::Relaxed);
        if let Some(credentials) = &self.credentials {
            conn.auth(DEFAULT_MECHANISMS, credentials)
                .await
                .map_err(SendError::Auth)?;
        }
        Ok(Conn {
            smtp: Box::new(conn),
            offers,
        })
    }
}

/// One mail transaction: `MAIL`, `RCPT` and the message as one `BDAT` chunk
/// in one write when the server pipelines and takes chunks (and the message
/// is UTF-8, as ours always are); else `MAIL`, `RCPT` and `DATA` in one write
/// when it pipelines (see the module docs), one at a time otherwise, then
/// the message. A failure says at which step ([`classify`] needs it). Every
/// reply is read with lettre's `read_response`, so errors are lettre's; on the
/// first negative reply the connection is aborted (as lettre's `send` does),
/// so unread replies can never be taken for another mail's.
async fn transaction(
    conn: &mut AsyncSmtpConnection,
    envelope: &SmtpEnvelope,
    email: &[u8],
    offers: Offers,
    ascii_addresses: bool,
) -> Result<(), (SmtpStep, lettre::transport::smtp::Error)> {
    let mut parameters = Vec::new();
    if !ascii_addresses {
        // The caller checked that the server offers SMTPUTF8.
        parameters.push(MailParameter::SmtpUtfEight);
    }
    if !email.is_ascii() {
        if !conn.server_info().supports_feature(Extension::EightBitMime) {
            // lettre's path refuses it with its own client error.
            let refused = conn.send(envelope, email).await.map(drop);
            return refused.map_err(|e| (SmtpStep::Data, e));
        }
        parameters.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    let mail = Mail::new(envelope.from().cloned(), parameters).to_string();
    let rcpts: Vec<String> = envelope
        .to()
        .iter()
        .map(|to| Rcpt::new(to.clone(), Vec::new()).to_string())
        .collect();
    // The replies come in the order of the commands: MAIL, each RCPT, then
    // DATA's 354 or the chunk's acceptance.
    let steps = std::iter::once(SmtpStep::Mail)
        .chain(rcpts.iter().map(|_| SmtpStep::Rcpt))
        .chain(std::iter::once(SmtpStep::Data));
    let replies = if offers.pipelining {
        let mut group = mail;
        group.extend(rcpts.iter().map(String::as_str));
        // One recipient only: with several, a chunk sent along would still be
        // delivered to the accepted ones after another was refused, where
        // DATA's content is never sent (and a retry would send it twice).
        // Ours always have one.
        if offers.chunking
            && rcpts.len() == 1
            && let Ok(text) = std::str::from_utf8(email)
        {
            let sent = pipelined(conn, &chunked(group, text), steps).await;
            return aborted_on_error(conn, sent).await;
        }
        group.push_str(&Data.to_string());
        pipelined(conn, &group, steps).await
    } else {
        let data = Data.to_string();
        let commands = std::iter::once(&mail)
            .chain(&rcpts)
            .chain(std::iter::once(&data));
        let mut result = Ok(());
        for (command, step) in commands.zip(steps) {
            if let Err(e) = conn.command(Verbatim(command)).await {
                result = Err((step, e));
                break;
            }
        }
        result
    };
    aborted_on_error(conn, replies).await?;
    // The message dot-stuffed with its terminator, in one write; lettre's
    // `message` (stuffing a byte at a time) only for bytes that are not text,
    // which our messages never are.
    let sent = match dot_stuffed(email) {
        Some(data) => conn.command(Verbatim(&data)).await,
        None => conn.message(email).await,
    };
    let sent = sent.map(drop).map_err(|e| (SmtpStep::Data, e));
    aborted_on_error(conn, sent).await
}

/// `result`, after aborting the session if it is a negative reply or an I/O
/// error (as lettre's `send` does), so that replies left unread can never be
/// taken for another mail's.
async fn aborted_on_error<T, E>(
    conn: &mut AsyncSmtpConnection,
    result: Result<T, E>,
) -> Result<T, E> {
    if result.is_err() {
        conn.abort().await;
    }
    result
}

/// Writes `group` (commands, each ending with CRLF) at once and reads one
/// reply per step, in order; the first negative reply or I/O error ends it,
/// naming its step (`command` writes and reads the first reply, the others
/// follow in order).
async fn pipelined(
    conn: &mut AsyncSmtpConnection,
    group: &str,
    steps: impl Iterator<Item = SmtpStep>,
) -> Result<(), (SmtpStep, lettre::transport::smtp::Error)> {
    for (i, step) in steps.enumerate() {
        let reply = if i == 0 {
            conn.command(Verbatim(group)).await
        } else {
            conn.read_response().await
        };
        reply.map_err(|e| (step, e))?;
    }
    Ok(())
}

/// `group` (the `MAIL` and `RCPT` commands) followed by `BDAT <size> LAST`
/// and `message` as its chunk. The chunk carries the line ends it is given,
/// so a message that does not end its last line gets the CRLF that DATA's
/// terminator would have supplied: both paths deliver the same bytes.
fn chunked(mut group: String, message: &str) -> String {
    push_chunk(&mut group, message);
    group
}

/// Appends `BDAT <size> LAST` and `message` as its chunk (see [`chunked`]).
fn push_chunk(group: &mut String, message: &str) {
    let ends_line = message.ends_with("\r\n");
    let size = message.len() + if ends_line { 0 } else { 2 };
    group.reserve(size + 24);
    let _ = write!(group, "BDAT {size} LAST\r\n");
    group.push_str(message);
    if !ends_line {
        group.push_str("\r\n");
    }
}

/// DATA's payload: `message` with one more dot on each line that starts
/// with a dot (RFC 5321, 4.5.2; lines end with CRLF, as lettre's codec reads
/// them), then the terminator: `.` on a line of its own, after a CRLF ending
/// the last line when the message lacks one (lettre's `message` always writes
/// `\r\n.\r\n`, adding an empty line to a message that ends its last line).
/// `None` if it is not UTF-8.
fn dot_stuffed(message: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(message).ok()?;
    let mut out = String::new();
    push_dot_stuffed(&mut out, text);
    Some(out)
}

/// Appends DATA's payload for `message` (see [`dot_stuffed`]).
fn push_dot_stuffed(out: &mut String, message: &str) {
    out.reserve(message.len() + 16);
    if message.starts_with('.') {
        out.push('.');
    }
    let mut copied = 0;
    for at in memchr::memmem::find_iter(message.as_bytes(), b"\r\n.") {
        // `at + 3` follows the ASCII dot: a character boundary.
        out.push_str(&message[copied..at + 3]);
        out.push('.');
        copied = at + 3;
    }
    out.push_str(&message[copied..]);
    if !message.ends_with("\r\n") {
        out.push_str("\r\n");
    }
    out.push_str(".\r\n");
}

/// Commands already formatted (each ends with CRLF), written as one.
struct Verbatim<'a>(&'a str);

impl std::fmt::Display for Verbatim<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// Says QUIT in the background (bounded), so the server is not left guessing.
fn retire(mut conn: Box<AsyncSmtpConnection>) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.quit()).await;
    });
}

#[cfg(test)]
mod tests;
