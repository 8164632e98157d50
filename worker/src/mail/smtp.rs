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
//! lettre writes the message and its final `.` separately and Nagle's
//! algorithm would hold the latter back for a delayed ACK (about 40 ms per
//! mail). `smtps://` connections are opened by lettre and keep Nagle.
//!
//! # Pipelining
//!
//! When the server offers `PIPELINING` (RFC 2920; Postfix and most MTAs do),
//! `MAIL FROM`, `RCPT TO` and `DATA` go out in one write and their replies
//! are read in order, then the message, dot-stuffed and terminated by
//! lettre: two round trips per mail instead of four, which halves
//! the time a mail holds its connection and the system calls on both ends.
//! Replies are read and judged exactly as lettre's own
//! `send` does (its `read_response`: a negative reply is an error with the
//! same classification, and the connection is aborted, never reused), so a
//! refusal at any step means what it meant before. Servers without it get the
//! same commands one at a time, as lettre's `send` writes them.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use lettre::address::Envelope as SmtpEnvelope;
use lettre::transport::smtp::authentication::{Credentials, DEFAULT_MECHANISMS};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::commands::{Data, Ehlo, Mail, Rcpt};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use secrecy::{ExposeSecret, SecretString};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use verimail_shared::config::SmtpSecurity;

use super::{MailerError, SendError, SmtpStep};

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
            permits: Semaphore::new(size),
            max_idle: size,
            idle: Mutex::new(Vec::with_capacity(size)),
        })
    }

    /// Sends `bytes` to `envelope`'s recipients on a pooled connection.
    pub(super) async fn send(
        &self,
        envelope: &SmtpEnvelope,
        bytes: &[u8],
    ) -> Result<(), SendError> {
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
    // lettre dot-stuffs the message and writes the terminator.
    match conn.message(email).await {
        Ok(_) => Ok(()),
        Err(e) => {
            conn.abort().await;
            Err((SmtpStep::Data, e))
        }
    }
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
    use std::sync::Arc;
    use std::time::Instant;

    use super::*;
    use crate::mail::test_support::{TestResult, config, envelope, mail, mailer};
    use crate::mail::{Classification, Mailer, Refusal};
    use verimail_tests::smtp::SmtpServer;

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
