//! Building the MIME message and delivering it: pooled SMTP or a `file://` outbox.
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
//! lettre writes the message and its final `.` separately and Nagle's
//! algorithm would hold the latter back for a delayed ACK (about 40 ms per
//! mail). `smtps://` connections are opened by lettre and keep Nagle.
//!
//! # Pipelining
//!
//! When the server offers `PIPELINING` (RFC 2920; Postfix and most MTAs do),
//! `MAIL FROM`, `RCPT TO` and `DATA` go out in one write and their replies
//! are read in order, then the message, dot-stuffed and terminated in one
//! write of its own: two round trips per mail instead of four, which halves
//! the time a mail holds its connection and the system calls on both ends. Replies are read and judged exactly as lettre's own
//! `send` does (its `read_response`: a negative reply is an error with the
//! same classification, and the connection is aborted, never reused), so a
//! refusal at any step means what it meant before. Servers without it get the
//! same commands one at a time, as lettre's `send` writes them.
//!
//! # Classification
//!
//! [`classify`] is the one function that says what a failure means, from the
//! step that failed and the reply's enhanced status code (RFC 3463):
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

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use lettre::address::{AddressError, Envelope as SmtpEnvelope};
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::{Credentials, DEFAULT_MECHANISMS};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::commands::{Data, Ehlo, Mail, Rcpt};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use lettre::{Address, Message};
use secrecy::ExposeSecret;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tracing::{debug, warn};
use verimail_shared::config::{Config, MailUrl, SmtpSecurity, outbox_file_name};

use super::{Classification, Envelope, Refusal, RenderedMail};

/// Longest a single delivery attempt may take, connection included. Long
/// enough for a slow server's reply to the message (content scanning), short
/// enough that a stuck one frees the worker's slot.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
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
/// First delay between in-process attempts; it doubles, with jitter, up to [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest delay between in-process attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Histogram of single attempts, seconds, by `result`.
pub const ATTEMPT_SECONDS: &str = "verimail_worker_smtp_attempt_seconds";
/// Counter of attempts by `result` (`sent`, `transient`, `permanent`).
pub const ATTEMPTS: &str = "verimail_worker_smtp_attempts_total";

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
    /// Writing to the `file://` outbox failed.
    #[error("writing the mail file failed: {0}")]
    File(#[source] std::io::Error),
    /// The recipient address is not one lettre can send to.
    #[error("the recipient address is unusable: {0}")]
    Address(#[source] AddressError),
    /// The message could not be built.
    #[error("the message could not be built: {0}")]
    Message(#[source] lettre::error::Error),
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
            Classification::Transient | Classification::RecipientRejected => self.to_string(),
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
        | SendError::File(_) => Classification::Transient,
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

/// A mailer could not be built from `MAIL_URL`/`MAIL_FROM`.
#[derive(Debug, thiserror::Error)]
pub enum MailerError {
    /// `MAIL_FROM` is not a mailbox lettre accepts.
    #[error("MAIL_FROM: `{value}` is not a mailbox ({source})")]
    From {
        /// The configured value.
        value: String,
        /// lettre's complaint.
        #[source]
        source: AddressError,
    },
    /// The `file://` outbox folder could not be created.
    #[error("MAIL_URL: cannot create the outbox folder {}: {source}", dir.display())]
    Outbox {
        /// The folder.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// TLS parameters could not be built for the host.
    #[error("MAIL_URL: TLS set-up for `{host}` failed: {source}")]
    Tls {
        /// The SMTP host.
        host: String,
        /// lettre's error.
        #[source]
        source: lettre::transport::smtp::Error,
    },
}

/// Delivers mail over pooled SMTP or into a `file://` outbox.
#[derive(Debug, Clone)]
pub struct Mailer {
    from: Mailbox,
    /// Right-hand side of our `Message-ID`s: the sender's domain.
    id_domain: String,
    transport: Arc<Transport>,
    attempt_timeout: Duration,
}

#[derive(Debug)]
enum Transport {
    Smtp(SmtpPool),
    /// The outbox folder: one `{request_id}.eml` per mail.
    File(std::path::PathBuf),
}

impl Mailer {
    /// Builds the transport from the configuration (warns when `MAIL_URL` is the default).
    pub fn from_config(config: &Config) -> Result<Self, MailerError> {
        let from: Mailbox = config
            .mail_from
            .parse()
            .map_err(|source| MailerError::From {
                value: config.mail_from.clone(),
                source,
            })?;
        let id_domain = from.email.domain().to_owned();
        let transport = match &config.mail_url {
            MailUrl::File(dir) => {
                std::fs::create_dir_all(dir).map_err(|source| MailerError::Outbox {
                    dir: dir.clone(),
                    source,
                })?;
                if config.mail_url_is_default {
                    warn!(
                        dir = %dir.display(),
                        "MAIL_URL is not set: mails are NOT sent, they are written as .eml files \
                         to the default outbox; set MAIL_URL=smtp://host:port to send"
                    );
                } else {
                    warn!(dir = %dir.display(), "MAIL_URL is file://: mails are written as .eml files, not sent");
                }
                Transport::File(dir.clone())
            }
            MailUrl::Smtp {
                security,
                host,
                port,
                credentials,
            } => {
                let tls = match security {
                    SmtpSecurity::None => None,
                    SmtpSecurity::Opportunistic | SmtpSecurity::Implicit => {
                        Some(TlsParameters::new(host.clone()).map_err(|source| {
                            MailerError::Tls {
                                host: host.clone(),
                                source,
                            }
                        })?)
                    }
                };
                let size = usize::from(config.worker_concurrency).clamp(1, MAX_CONNECTIONS);
                Transport::Smtp(SmtpPool {
                    host: host.clone(),
                    port: *port,
                    security: *security,
                    tls,
                    credentials: credentials.as_ref().map(|(user, pass)| {
                        Credentials::new(user.clone(), pass.expose_secret().to_owned())
                    }),
                    hello: ClientId::default(),
                    permits: Semaphore::new(size),
                    max_idle: size,
                    idle: Mutex::new(Vec::with_capacity(size)),
                })
            }
        };
        Ok(Self {
            from,
            id_domain,
            transport: Arc::new(transport),
            attempt_timeout: ATTEMPT_TIMEOUT,
        })
    }

    /// The same mailer with another per-attempt deadline (tests use short ones).
    pub fn with_attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = timeout;
        self
    }

    /// Sends once.
    pub async fn send(&self, to: &Envelope<'_>, mail: &RenderedMail) -> Result<(), SendError> {
        let message = self.build(to, mail)?;
        self.attempt(&message, to.request_id).await
    }

    /// Sends, retrying transient failures in-process with exponential backoff
    /// and jitter for at most `budget`; returns the last error otherwise.
    ///
    /// The first attempt always runs; a retry starts only if its delay ends
    /// within `budget`, so the call returns within `budget` plus one attempt
    /// ([`ATTEMPT_TIMEOUT`]).
    pub async fn send_with_backoff(
        &self,
        to: &Envelope<'_>,
        mail: &RenderedMail,
        budget: Duration,
    ) -> Result<(), SendError> {
        let message = self.build(to, mail)?;
        let started = Instant::now();
        let backoff = ExponentialBuilder::default()
            .with_min_delay(BACKOFF_MIN)
            .with_factor(2.0)
            .with_max_delay(BACKOFF_MAX)
            .with_jitter()
            .without_max_times();
        (|| self.attempt(&message, to.request_id))
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(|e| classify(e) == Classification::Transient)
            .adjust(|_, delay| delay.filter(|d| started.elapsed() + *d <= budget))
            .notify(|e, delay| debug!(error = %e, retry_in_ms = delay.as_millis(), "send failed; retrying"))
            .await
    }

    /// The MIME message: multipart/alternative (text, HTML), with a
    /// `Message-ID` derived from the request id.
    fn build(&self, to: &Envelope<'_>, mail: &RenderedMail) -> Result<Message, SendError> {
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
            .message_id(Some(message_id(to.request_id, &self.id_domain)))
            .multipart(MultiPart::alternative_plain_html(
                mail.text.clone(),
                mail.html.clone(),
            ))
            .map_err(SendError::Message)
    }

    /// One attempt under the deadline, measured.
    async fn attempt(&self, message: &Message, request_id: &str) -> Result<(), SendError> {
        let started = Instant::now();
        let result =
            match tokio::time::timeout(self.attempt_timeout, self.deliver(message, request_id))
                .await
            {
                Ok(result) => result,
                Err(_) => Err(SendError::Timeout(self.attempt_timeout)),
            };
        let label = match &result {
            Ok(()) => "sent",
            Err(e) => match classify(e) {
                Classification::Transient => "transient",
                Classification::RecipientRejected | Classification::Refused(_) => "permanent",
            },
        };
        metrics::histogram!(ATTEMPT_SECONDS, "result" => label)
            .record(started.elapsed().as_secs_f64());
        metrics::counter!(ATTEMPTS, "result" => label).increment(1);
        result
    }

    async fn deliver(&self, message: &Message, request_id: &str) -> Result<(), SendError> {
        let bytes = message.formatted();
        let envelope = message.envelope();
        match &*self.transport {
            Transport::Smtp(pool) => pool.send(envelope, &bytes).await,
            Transport::File(dir) => write_outbox(dir, request_id, &bytes)
                .await
                .map_err(SendError::File),
        }
    }
}

/// Writes `{request_id}.eml` (see `outbox_file_name`) into the outbox: to a
/// hidden temporary file first, renamed into place, so a reader never sees half
/// a mail and a redelivered request replaces its own file instead of adding one.
async fn write_outbox(
    dir: &std::path::Path,
    request_id: &str,
    bytes: &[u8],
) -> std::io::Result<()> {
    let name = outbox_file_name(request_id);
    let temporary = dir.join(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
    tokio::fs::write(&temporary, bytes).await?;
    let renamed = tokio::fs::rename(&temporary, dir.join(name)).await;
    if renamed.is_err() {
        let _ = tokio::fs::remove_file(&temporary).await;
    }
    renamed
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

/// A small pool of SMTP connections (see the module docs for why not lettre's).
struct SmtpPool {
    host: String,
    port: u16,
    security: SmtpSecurity,
    tls: Option<TlsParameters>,
    credentials: Option<Credentials>,
    hello: ClientId,
    /// Caps the connections open at once.
    permits: Semaphore,
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
    smtp: AsyncSmtpConnection,
    /// The server announced `PIPELINING` in its reply to our `EHLO`.
    pipelining: bool,
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
    async fn send(&self, envelope: &SmtpEnvelope, bytes: &[u8]) -> Result<(), SendError> {
        // The semaphore is never closed, so acquiring fails only in theory.
        let _permit = self.permits.acquire().await.ok();
        let mut conn = self.checkout().await?;
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
            transaction(&mut conn.smtp, envelope, bytes, conn.pipelining, ascii).await
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
                return self.connect().await;
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
        // whether the server pipelines: one round trip per connection.
        let offered = conn
            .command(Ehlo::new(self.hello.clone()))
            .await
            .map_err(SendError::Session)?;
        let pipelining = offered.message().any(|line| {
            line.split_whitespace()
                .next()
                .is_some_and(|w| w.eq_ignore_ascii_case("PIPELINING"))
        });
        if let Some(credentials) = &self.credentials {
            conn.auth(DEFAULT_MECHANISMS, credentials)
                .await
                .map_err(SendError::Auth)?;
        }
        Ok(Conn {
            smtp: conn,
            pipelining,
        })
    }
}

/// One mail transaction: `MAIL`, `RCPT` and `DATA` in one write when the
/// server pipelines (see the module docs), one at a time otherwise, then the
/// message; a failure says at which step ([`classify`] needs it). Every reply
/// is read with lettre's `read_response`, so errors are lettre's; on the
/// first negative reply the connection is aborted (as lettre's `send` does),
/// so unread replies can never be taken for another mail's.
async fn transaction(
    conn: &mut AsyncSmtpConnection,
    envelope: &SmtpEnvelope,
    email: &[u8],
    pipelining: bool,
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
    // The replies come in the order of the commands: MAIL, each RCPT, DATA's 354.
    let steps = std::iter::once(SmtpStep::Mail)
        .chain(rcpts.iter().map(|_| SmtpStep::Rcpt))
        .chain(std::iter::once(SmtpStep::Data));
    let replies: Result<(), (SmtpStep, lettre::transport::smtp::Error)> = if pipelining {
        let mut commands = mail;
        commands.extend(rcpts.iter().map(String::as_str));
        commands.push_str(&Data.to_string());
        // `command` writes the whole group at once and reads the first reply;
        // the others follow in order.
        let mut result = Ok(());
        for (i, step) in steps.enumerate() {
            let reply = if i == 0 {
                conn.command(Verbatim(&commands)).await
            } else {
                conn.read_response().await
            };
            if let Err(e) = reply {
                result = Err((step, e));
                break;
            }
        }
        result
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
    if let Err(e) = replies {
        conn.abort().await;
        return Err(e);
    }
    // An ASCII message (lettre's MIME output unless 8BITMIME is used) goes out
    // dot-stuffed with its terminator in one write; lettre's `message` writes
    // the two apart and stuffs byte by byte.
    let sent = match std::str::from_utf8(email) {
        Ok(text) if email.is_ascii() => conn.command(Verbatim(&data_payload(text))).await,
        _ => conn.message(email).await,
    };
    match sent {
        Ok(_) => Ok(()),
        Err(e) => {
            conn.abort().await;
            Err((SmtpStep::Data, e))
        }
    }
}

/// The DATA payload exactly as lettre's `message` sends it: a line starting
/// with `.` gets a second one (RFC 5321, 4.5.2), a line being what follows
/// the start or a CRLF; then the terminating `CRLF.CRLF`.
fn data_payload(email: &str) -> String {
    let mut out = String::with_capacity(email.len() + 64);
    for line in email.split_inclusive("\r\n") {
        if line.starts_with('.') {
            out.push('.');
        }
        out.push_str(line);
    }
    out.push_str("\r\n.\r\n");
    out
}

/// Commands already formatted (each ends with CRLF), written as one.
struct Verbatim<'a>(&'a str);

impl std::fmt::Display for Verbatim<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// Says QUIT in the background (bounded), so the server is not left guessing.
fn retire(mut conn: AsyncSmtpConnection) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.quit()).await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use verimail_tests::smtp::{Mode, SmtpServer};

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn config(vars: &[(&str, &str)]) -> Result<Config, verimail_shared::ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::from_lookup(|name| map.get(name).cloned())
    }

    fn mailer(mail_url: &str) -> Result<Mailer, Box<dyn std::error::Error>> {
        Ok(Mailer::from_config(&config(&[
            ("MAIL_URL", mail_url),
            ("MAIL_FROM", "verimail <no-reply@verimail.test>"),
        ])?)?)
    }

    fn mail() -> RenderedMail {
        RenderedMail {
            subject: "请确认您的邮箱地址".into(),
            text: "Hello,\n\nhttp://127.0.0.1:8080/confirm/abc.def-ghi\n".into(),
            html: "<p><a href=\"http://127.0.0.1:8080/confirm/abc.def-ghi\">go</a></p>".into(),
            locale: "zh-CN".into(),
        }
    }

    fn envelope<'a>(name: Option<&'a str>, email: &'a str) -> Envelope<'a> {
        Envelope {
            to_name: name,
            to_email: email,
            request_id: "5f1c-req/1",
        }
    }

    /// A port nothing listens on (bound, then released).
    fn closed_port() -> Result<u16, std::io::Error> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        Ok(listener.local_addr()?.port())
    }

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
    fn the_data_payload_is_dot_stuffed_and_terminated_as_lettre_does() {
        assert_eq!(data_payload("a\r\nb"), "a\r\nb\r\n.\r\n");
        assert_eq!(
            data_payload(".x\r\n.\r\nmid.dle\r\n..y\r\n"),
            "..x\r\n..\r\nmid.dle\r\n...y\r\n\r\n.\r\n"
        );
        // Only CRLF ends a line (a bare LF or CR does not, as in lettre's codec).
        assert_eq!(data_payload("a\n.b\r.c"), "a\n.b\r.c\r\n.\r\n");
        assert_eq!(data_payload(""), "\r\n.\r\n");
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

    #[tokio::test]
    async fn an_unwritable_outbox_is_transient_and_a_writable_one_gets_eml_files() -> TestResult {
        let dir = std::env::temp_dir().join(format!("verimail-outbox-{}", uuid::Uuid::new_v4()));
        let m = mailer(&format!("file://{}", dir.display()))?;
        m.send(&envelope(Some("Alice"), "alice@example.com"), &mail())
            .await?;
        // A redelivered request replaces its own file.
        m.send(&envelope(Some("Alice"), "alice@example.com"), &mail())
            .await?;
        let files: Vec<_> = std::fs::read_dir(&dir)?.collect::<Result<_, _>>()?;
        assert_eq!(files.len(), 1);
        // `{request_id}.eml`, the `/` of the id "5f1c-req/1" encoded.
        assert_eq!(files[0].file_name(), "5f1c-req%2F1.eml");
        let eml = std::fs::read(files[0].path())?;
        let parsed = mail_parser::MessageParser::default()
            .parse(&eml)
            .ok_or("unparsable .eml")?;
        assert_eq!(parsed.subject(), Some("请确认您的邮箱地址"));

        std::fs::remove_dir_all(&dir)?;
        std::fs::write(&dir, "a file where the outbox was")?;
        let err = m
            .send(&envelope(None, "alice@example.com"), &mail())
            .await
            .err()
            .ok_or("I/O error expected")?;
        assert!(matches!(err, SendError::File(_)), "{err:?}");
        assert_eq!(err.classification(), Classification::Transient);
        std::fs::remove_file(&dir)?;
        Ok(())
    }

    #[tokio::test]
    async fn backoff_retries_transient_failures_until_the_server_recovers() -> TestResult {
        let mut server = SmtpServer::start();
        let m = mailer(&server.mail_url())?;
        server.stop();
        let sending = {
            let m = m.clone();
            tokio::spawn(async move {
                m.send_with_backoff(
                    &envelope(None, "carol@example.com"),
                    &mail(),
                    Duration::from_secs(10),
                )
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(400)).await;
        server.resume();
        sending.await??;
        assert_eq!(
            server.wait_for_mails(1, Duration::from_secs(5)).await.len(),
            1
        );
        Ok(())
    }

    #[tokio::test]
    async fn backoff_gives_up_when_the_budget_is_spent_and_never_retries_permanent() -> TestResult {
        let server = SmtpServer::start();
        let m = mailer(&server.mail_url())?;
        server.set_mode(Mode::TempFail);
        let started = Instant::now();
        let err = m
            .send_with_backoff(
                &envelope(None, "dan@example.com"),
                &mail(),
                Duration::from_millis(700),
            )
            .await
            .err()
            .ok_or("failure expected")?;
        assert_eq!(err.classification(), Classification::Transient);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        let tried = server.stats().rejected;
        assert!((2..=8).contains(&tried), "{tried} attempts");

        server.set_mode(Mode::PermFail);
        let before = server.stats().rejected;
        let err = m
            .send_with_backoff(
                &envelope(None, "dan@example.com"),
                &mail(),
                Duration::from_secs(10),
            )
            .await
            .err()
            .ok_or("failure expected")?;
        assert_eq!(err.classification(), Classification::RecipientRejected);
        assert_eq!(server.stats().rejected - before, 1, "a 5xx is not retried");
        Ok(())
    }

    #[test]
    fn a_bad_mail_from_names_the_variable() -> Result<(), verimail_shared::ConfigError> {
        // Passes the config's light check, fails lettre's parse.
        let c = config(&[("MAIL_FROM", "verimail <no reply@@localhost>")])?;
        let message = Mailer::from_config(&c)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.starts_with("MAIL_FROM: "), "{message}");
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn thousands_of_concurrent_sends_share_a_few_connections() -> TestResult {
        let server = SmtpServer::start();
        let m = Arc::new(Mailer::from_config(&config(&[
            ("MAIL_URL", &server.mail_url()),
            ("WORKER_CONCURRENCY", "16"),
        ])?)?);
        let total = 2000;
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for worker in 0..64 {
            let m = Arc::clone(&m);
            tasks.spawn(async move {
                for i in 0..total / 64 {
                    let email = format!("user{worker}-{i}@example.com");
                    m.send(&envelope(None, &email), &mail()).await?;
                }
                Ok::<(), SendError>(())
            });
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        let elapsed = started.elapsed();
        let sent = server.count();
        eprintln!(
            "{sent} mails in {elapsed:?} ({:.0}/s), {} connections",
            sent as f64 / elapsed.as_secs_f64(),
            server.stats().connections
        );
        assert_eq!(sent, total / 64 * 64);
        assert!(server.stats().connections <= 16, "{:?}", server.stats());
        Ok(())
    }

    /// A scripted server that offers PIPELINING (the test server does not):
    /// every `RCPT` gets `rcpt_reply`. Counts connections and accepted mails,
    /// and notes whether `RCPT` and `DATA` had arrived before `MAIL` was answered.
    struct Pipeliner {
        port: u16,
        connections: Arc<std::sync::atomic::AtomicUsize>,
        mails: Arc<std::sync::atomic::AtomicUsize>,
        pipelined: Arc<std::sync::atomic::AtomicBool>,
        /// Each accepted mail's DATA, as it came over the wire (terminator included).
        bodies: Arc<Mutex<Vec<String>>>,
    }

    impl Pipeliner {
        async fn start(rcpt_reply: &'static str) -> Result<Self, std::io::Error> {
            use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
            use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let port = listener.local_addr()?.port();
            let connections = Arc::new(AtomicUsize::new(0));
            let mails = Arc::new(AtomicUsize::new(0));
            let pipelined = Arc::new(AtomicBool::new(false));
            let bodies = Arc::new(Mutex::new(Vec::new()));
            let (c, m, p, b) = (
                connections.clone(),
                mails.clone(),
                pipelined.clone(),
                bodies.clone(),
            );
            tokio::spawn(async move {
                while let Ok((socket, _)) = listener.accept().await {
                    c.fetch_add(1, Ordering::SeqCst);
                    let (m, p, b) = (m.clone(), p.clone(), b.clone());
                    tokio::spawn(async move {
                        let (read, mut write) = socket.into_split();
                        let mut read = BufReader::new(read);
                        let mut line = String::new();
                        let mut rcpt_ok = false;
                        write.write_all(b"220 pipeliner\r\n").await?;
                        loop {
                            line.clear();
                            if read.read_line(&mut line).await? == 0 {
                                return Ok::<(), std::io::Error>(());
                            }
                            let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
                            let reply: &str = match verb.as_str() {
                                "EHLO" => "250-pipeliner\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
                                "MAIL" => {
                                    if !read.buffer().is_empty() {
                                        p.store(true, Ordering::SeqCst);
                                    }
                                    "250 ok\r\n"
                                }
                                "RCPT" => {
                                    rcpt_ok = rcpt_reply.starts_with('2');
                                    rcpt_reply
                                }
                                "DATA" if rcpt_ok => {
                                    write.write_all(b"354 go on\r\n").await?;
                                    let mut body = String::new();
                                    while !body.ends_with("\r\n.\r\n") {
                                        if read.read_line(&mut body).await? == 0 {
                                            return Ok(());
                                        }
                                    }
                                    m.fetch_add(1, Ordering::SeqCst);
                                    lock(&b).push(body);
                                    "250 queued\r\n"
                                }
                                "DATA" => "554 no valid recipients\r\n",
                                "QUIT" => {
                                    write.write_all(b"221 bye\r\n").await?;
                                    return Ok(());
                                }
                                _ => "250 ok\r\n",
                            };
                            write.write_all(reply.as_bytes()).await?;
                        }
                    });
                }
            });
            Ok(Self {
                port,
                connections,
                mails,
                pipelined,
                bodies,
            })
        }

        fn count(counter: &std::sync::atomic::AtomicUsize) -> usize {
            counter.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    #[tokio::test]
    async fn a_pipelining_server_gets_commands_in_one_write_on_one_reused_connection() -> TestResult
    {
        let server = Pipeliner::start("250 ok\r\n").await?;
        let m = mailer(&format!("smtp+plain://127.0.0.1:{}", server.port))?;
        for _ in 0..3 {
            m.send(&envelope(Some("Alice"), "alice@example.com"), &mail())
                .await?;
        }
        assert_eq!(Pipeliner::count(&server.mails), 3);
        assert_eq!(Pipeliner::count(&server.connections), 1);
        assert!(
            server.pipelined.load(std::sync::atomic::Ordering::SeqCst),
            "RCPT and DATA were sent before MAIL's reply"
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_line_starting_with_a_dot_arrives_intact_over_the_pipelined_path() -> TestResult {
        let server = Pipeliner::start("250 ok\r\n").await?;
        let m = mailer(&format!("smtp+plain://127.0.0.1:{}", server.port))?;
        let mut dotted = mail();
        dotted.subject = "Confirm".into();
        dotted.text = "Hello,\n.hidden unless stuffed\n.\nend\n".into();
        m.send(&envelope(None, "dot@example.com"), &dotted).await?;
        let bodies = lock(&server.bodies).clone();
        let [body] = bodies.as_slice() else {
            return Err(format!("one mail expected, got {}", bodies.len()).into());
        };
        // On the wire each such line carries one more dot, and the data ends
        // with the terminator; the receiver removes the dots (RFC 5321, 4.5.2).
        assert!(body.ends_with("\r\n.\r\n"), "{body}");
        assert!(body.contains("\r\n..hidden unless stuffed\r\n"), "{body}");
        let received = body
            .trim_end_matches(".\r\n")
            .split_inclusive("\r\n")
            .map(|line| line.strip_prefix('.').unwrap_or(line))
            .collect::<String>();
        let parsed = mail_parser::MessageParser::default()
            .parse(received.as_bytes())
            .ok_or("unparsable")?;
        assert_eq!(
            parsed.body_text(0).as_deref(),
            Some("Hello,\r\n.hidden unless stuffed\r\n.\r\nend\r\n")
        );
        Ok(())
    }

    #[tokio::test]
    async fn pipelined_refusals_keep_their_classification_and_drop_the_connection() -> TestResult {
        let server = Pipeliner::start("550 no such user\r\n").await?;
        let m = mailer(&format!("smtp+plain://127.0.0.1:{}", server.port))?;
        let to = envelope(None, "nobody@example.com");
        let err = m.send(&to, &mail()).await.err().ok_or("550 expected")?;
        assert!(matches!(err, SendError::Smtp { .. }), "{err:?}");
        assert_eq!(
            err.classification(),
            Classification::RecipientRejected,
            "{err}"
        );
        // The refused session was aborted: its unread DATA reply cannot be
        // taken for the next mail's, which gets a connection of its own.
        let err = m.send(&to, &mail()).await.err().ok_or("550 expected")?;
        assert_eq!(
            err.classification(),
            Classification::RecipientRejected,
            "{err}"
        );
        assert_eq!(Pipeliner::count(&server.connections), 2);
        assert_eq!(Pipeliner::count(&server.mails), 0);

        let server = Pipeliner::start("550 5.7.1 relaying denied\r\n").await?;
        let m = mailer(&format!("smtp+plain://127.0.0.1:{}", server.port))?;
        let err = m.send(&to, &mail()).await.err().ok_or("550 expected")?;
        let policy = Classification::Refused(Refusal::Policy);
        assert_eq!(err.classification(), policy, "{err}");

        let server = Pipeliner::start("451 try later\r\n").await?;
        let m = mailer(&format!("smtp+plain://127.0.0.1:{}", server.port))?;
        let err = m.send(&to, &mail()).await.err().ok_or("451 expected")?;
        assert_eq!(err.classification(), Classification::Transient, "{err}");
        Ok(())
    }
}
