//! An SMTP server inside the test process, with fault injection.
//!
//! It speaks SMTP through `mailin`'s session state machine (the engine of
//! `mailin-embedded`) but owns its sockets and threads, because
//! `mailin_embedded::Server::serve` blocks forever and cannot be stopped: tests
//! need [`SmtpServer::stop`] (connections refused) and [`SmtpServer::resume`] on the
//! same port, and a server that hangs ([`SmtpServer::set_hang`]).
//!
//! One std thread accepts, one std thread serves each connection (a pooled client
//! keeps a handful of connections open, so this stays small), so the server works
//! whatever tokio runtimes the test uses. Accepted mails are stored raw under one
//! mutex and parsed only when a test asks for them, so capturing costs the sender
//! almost nothing even at thousands of mails per second.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use mailin::{Action, AuthMechanism, Handler, Response, SessionBuilder};

/// A step of the SMTP session a test can make the server refuse
/// ([`SmtpServer::refuse`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    /// `AUTH` (the server then offers `AUTH PLAIN LOGIN`, over plain text).
    Auth,
    /// `MAIL FROM`.
    Mail,
    /// `RCPT TO` (takes precedence over the [`Mode`]).
    Rcpt,
    /// The end of `DATA` (the message itself).
    Data,
}

/// How the server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 250 to everything.
    Accept,
    /// 451 (transient) to every mail, answered to `RCPT TO`.
    TempFail,
    /// 550 (permanent) to every mail, answered to `RCPT TO`.
    PermFail,
}

impl Mode {
    fn to_u8(self) -> u8 {
        match self {
            Self::Accept => 0,
            Self::TempFail => 1,
            Self::PermFail => 2,
        }
    }

    fn from_u8(raw: u8) -> Self {
        match raw {
            1 => Self::TempFail,
            2 => Self::PermFail,
            _ => Self::Accept,
        }
    }
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
    /// The `Message-ID` header, without angle brackets.
    pub message_id: Option<String>,
    /// The `To` header as written (display name and address).
    pub to_header: Option<String>,
}

impl CapturedMail {
    fn parse(raw: &RawMail) -> Self {
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

/// Counters since the server started (they survive `stop`/`resume`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// TCP connections accepted.
    pub connections: u64,
    /// `MAIL FROM` commands (mail transactions begun).
    pub transactions: u64,
    /// Mails accepted and captured.
    pub accepted: u64,
    /// Recipients refused because of [`Mode::TempFail`] or [`Mode::PermFail`].
    pub rejected: u64,
}

struct RawMail {
    from: String,
    to: Vec<String>,
    data: Vec<u8>,
}

/// State shared by the acceptor, every session and the test.
#[derive(Default)]
struct Shared {
    /// A [`Mode`] as u8, read on every `RCPT`.
    mode: AtomicU8,
    /// While set, sessions read but never answer (timeout tests).
    hang: AtomicBool,
    /// Cleared by `stop`: the acceptor exits and sessions give up hanging.
    accepting: AtomicBool,
    mails: Mutex<Vec<RawMail>>,
    connections: AtomicU64,
    transactions: AtomicU64,
    rejected: AtomicU64,
    /// Clones of live session sockets, so `stop` can cut them: a pooled client
    /// must not keep delivering through a server that is "down".
    open: Mutex<HashMap<u64, TcpStream>>,
    next_id: AtomicU64,
    /// Replies a test set for a step, instead of the usual one.
    refusals: Mutex<HashMap<Step, (u16, String)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking session thread must not take every later assertion down with it.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running SMTP server on 127.0.0.1.
#[derive(Debug)]
pub struct SmtpServer {
    /// Where it listens.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("mode", &Mode::from_u8(self.mode.load(Ordering::Relaxed)))
            .field("hang", &self.hang.load(Ordering::Relaxed))
            .field("accepting", &self.accepting.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl SmtpServer {
    /// Starts on a free port (panics when the test machine has no socket to give).
    pub fn start() -> Self {
        Self::try_start().unwrap_or_else(|e| panic!("cannot start the test SMTP server: {e}"))
    }

    /// Starts on a free port.
    pub fn try_start() -> io::Result<Self> {
        // Binding port 0 ourselves (rather than reserving and releasing one) means
        // the port is ours before anyone can connect, and we know it at once.
        let listener = TcpListener::bind(("127.0.0.1", 0))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        shared.accepting.store(true, Ordering::SeqCst);
        let acceptor = spawn_acceptor(listener, Arc::clone(&shared))?;
        Ok(Self {
            addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// `smtp+plain://127.0.0.1:PORT`, for `MAIL_URL`.
    pub fn mail_url(&self) -> String {
        format!("smtp+plain://{}", self.addr)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Changes how it answers from now on.
    pub fn set_mode(&self, mode: Mode) {
        self.shared.mode.store(mode.to_u8(), Ordering::SeqCst);
    }

    /// From now on, answers `step` with `code` and `text` (say
    /// `550`, `"5.1.1 No such user"`). A refusal of [`Step::Auth`] also makes
    /// new sessions offer `AUTH` (a client without credentials never uses it).
    pub fn refuse(&self, step: Step, code: u16, text: &str) {
        lock(&self.shared.refusals).insert(step, (code, text.to_owned()));
    }

    /// Forgets every [`SmtpServer::refuse`].
    pub fn clear_refusals(&self) {
        lock(&self.shared.refusals).clear();
    }

    /// How it answers now.
    pub fn mode(&self) -> Mode {
        Mode::from_u8(self.shared.mode.load(Ordering::SeqCst))
    }

    /// While `true`, the server accepts connections and reads commands but answers
    /// nothing (not even the greeting), like a stuck server; `false` lets waiting
    /// sessions answer again.
    pub fn set_hang(&self, hang: bool) {
        self.shared.hang.store(hang, Ordering::SeqCst);
    }

    /// Stops listening (connections refused) until [`SmtpServer::resume`]; open
    /// sessions are cut.
    pub fn stop(&mut self) {
        if !self.shared.accepting.swap(false, Ordering::SeqCst) {
            return;
        }
        // The acceptor blocks in accept(): one connection wakes it to see the flag;
        // it then returns and drops the listener, which closes the port.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for (_, stream) in lock(&self.shared.open).drain() {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// Listens again on the same port (panics if the port cannot be had back
    /// within 10 seconds).
    pub fn resume(&mut self) {
        if self.acceptor.is_some() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(self.addr) {
                Ok(l) => break l,
                // Another socket may hold the port for a moment (another test's connect).
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("cannot listen on {} again: {e}", self.addr),
            }
        };
        self.shared.accepting.store(true, Ordering::SeqCst);
        match spawn_acceptor(listener, Arc::clone(&self.shared)) {
            Ok(acceptor) => self.acceptor = Some(acceptor),
            Err(e) => panic!("cannot start the acceptor thread: {e}"),
        }
    }

    /// Whether it is listening (not stopped).
    pub fn is_running(&self) -> bool {
        self.acceptor.is_some()
    }

    /// How many mails were accepted so far (cheap: no parsing).
    pub fn count(&self) -> usize {
        lock(&self.shared.mails).len()
    }

    /// Every mail accepted so far, parsed.
    pub fn mails(&self) -> Vec<CapturedMail> {
        lock(&self.shared.mails)
            .iter()
            .map(CapturedMail::parse)
            .collect()
    }

    /// Forgets the mails accepted so far (counters stay).
    pub fn clear(&self) {
        lock(&self.shared.mails).clear();
    }

    /// Counters since start.
    pub fn stats(&self) -> Stats {
        Stats {
            connections: self.shared.connections.load(Ordering::SeqCst),
            transactions: self.shared.transactions.load(Ordering::SeqCst),
            accepted: lock(&self.shared.mails).len() as u64,
            rejected: self.shared.rejected.load(Ordering::SeqCst),
        }
    }

    /// Waits until at least `n` mails were accepted, or `timeout`; returns
    /// every mail accepted by then (fewer than `n` on timeout).
    pub async fn wait_for_mails(&self, n: usize, timeout: Duration) -> Vec<CapturedMail> {
        let deadline = Instant::now() + timeout;
        while self.count() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.mails()
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn_acceptor(listener: TcpListener, shared: Arc<Shared>) -> io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name("test-smtp-accept".into())
        .spawn(move || {
            for conn in listener.incoming() {
                if !shared.accepting.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = conn else {
                    // Out of file descriptors and the like: do not spin.
                    thread::sleep(Duration::from_millis(5));
                    continue;
                };
                shared.connections.fetch_add(1, Ordering::SeqCst);
                let shared = Arc::clone(&shared);
                // If no thread can be had, dropping the stream closes the connection.
                let _ = thread::Builder::new()
                    .name("test-smtp-session".into())
                    .spawn(move || serve_connection(stream, shared));
            }
        })
}

fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
    if let Ok(clone) = stream.try_clone() {
        lock(&shared.open).insert(id, clone);
    }
    // A `stop` that ran between accept and registration did not see this socket.
    if shared.accepting.load(Ordering::SeqCst) {
        let _ = run_session(&stream, &shared);
    }
    let _ = stream.shutdown(Shutdown::Both);
    lock(&shared.open).remove(&id);
}

fn run_session(stream: &TcpStream, shared: &Arc<Shared>) -> io::Result<()> {
    // Replies are one small write each; without NODELAY, Nagle would hold them back.
    stream.set_nodelay(true)?;
    let peer = stream
        .peer_addr()
        .map(|a| a.ip())
        .unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let handler = Capture {
        shared: Arc::clone(shared),
        envelope: None,
        data: Vec::new(),
    };
    let mut builder = SessionBuilder::new("verimail-test-smtp");
    if lock(&shared.refusals).contains_key(&Step::Auth) {
        builder
            .enable_auth(AuthMechanism::Plain)
            .enable_auth(AuthMechanism::Login)
            .insecure_enable_plaintext_auth();
    }
    let mut session = builder.build(peer, handler);
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut out = Vec::with_capacity(256);
    respond(&mut writer, &session.greeting(), &mut out, shared)?;
    let mut line = Vec::with_capacity(1024);
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        let res = session.process(&line);
        match res.action {
            Action::NoReply => {}
            Action::Reply => respond(&mut writer, &res, &mut out, shared)?,
            // No TLS here: STARTTLS is never offered, so UpgradeTls cannot happen.
            Action::Close | Action::UpgradeTls => {
                respond(&mut writer, &res, &mut out, shared)?;
                return Ok(());
            }
        }
    }
}

fn respond(
    writer: &mut &TcpStream,
    res: &Response,
    out: &mut Vec<u8>,
    shared: &Shared,
) -> io::Result<()> {
    while shared.hang.load(Ordering::SeqCst) && shared.accepting.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(5));
    }
    out.clear();
    res.write_to(out)?;
    writer.write_all(out)
}

/// One session's handler: decides per `RCPT` from the mode, keeps the data.
struct Capture {
    shared: Arc<Shared>,
    /// Envelope sender and recipients of the transaction in progress.
    envelope: Option<(String, Vec<String>)>,
    data: Vec<u8>,
}

impl Capture {
    /// The reply a test set for `step`, if any.
    fn refusal(&self, step: Step) -> Option<Response> {
        let refusals = lock(&self.shared.refusals);
        let (code, text) = refusals.get(&step)?;
        Some(Response::custom(*code, text.clone()))
    }
}

impl Handler for Capture {
    fn mail(&mut self, _ip: IpAddr, _domain: &str, _from: &str) -> Response {
        self.shared.transactions.fetch_add(1, Ordering::SeqCst);
        self.refusal(Step::Mail).unwrap_or(mailin::response::OK)
    }

    fn rcpt(&mut self, _to: &str) -> Response {
        if let Some(refused) = self.refusal(Step::Rcpt) {
            self.shared.rejected.fetch_add(1, Ordering::SeqCst);
            return refused;
        }
        match Mode::from_u8(self.shared.mode.load(Ordering::SeqCst)) {
            Mode::Accept => mailin::response::OK,
            Mode::TempFail => {
                self.shared.rejected.fetch_add(1, Ordering::SeqCst);
                Response::custom(451, "4.3.0 Try again later (test server)".into())
            }
            Mode::PermFail => {
                self.shared.rejected.fetch_add(1, Ordering::SeqCst);
                Response::custom(550, "5.1.1 Mailbox unavailable (test server)".into())
            }
        }
    }

    fn data_start(&mut self, _domain: &str, from: &str, _is8bit: bool, to: &[String]) -> Response {
        self.data.clear();
        // mailin hands over its record of the transaction here, which already
        // accounts for RSET and refused recipients.
        self.envelope = Some((from.to_owned(), to.to_vec()));
        mailin::response::OK
    }

    fn data(&mut self, buf: &[u8]) -> io::Result<()> {
        self.data.extend_from_slice(buf);
        Ok(())
    }

    fn auth_plain(&mut self, _authz: &str, _authn: &str, _password: &str) -> Response {
        self.refusal(Step::Auth)
            .unwrap_or(mailin::response::AUTH_OK)
    }

    fn auth_login(&mut self, _username: &str, _password: &str) -> Response {
        self.refusal(Step::Auth)
            .unwrap_or(mailin::response::AUTH_OK)
    }

    fn data_end(&mut self) -> Response {
        if let Some(refused) = self.refusal(Step::Data) {
            self.envelope = None;
            self.data.clear();
            return refused;
        }
        let (from, to) = self.envelope.take().unwrap_or_default();
        let mail = RawMail {
            from,
            to,
            data: std::mem::take(&mut self.data),
        };
        lock(&self.shared.mails).push(mail);
        mailin::response::OK
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lettre::message::{Mailbox, MultiPart};
    use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn transport(server: &SmtpServer) -> AsyncSmtpTransport<Tokio1Executor> {
        AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
            .port(server.port())
            .timeout(Some(Duration::from_secs(5)))
            .build()
    }

    fn message(n: usize) -> Result<Message, Box<dyn std::error::Error>> {
        let to: Mailbox = format!("Alice <alice{n}@example.com>").parse()?;
        Ok(Message::builder()
            .from("verimail <no-reply@localhost>".parse()?)
            .to(to)
            .subject(format!("Confirm your address {n}"))
            .multipart(MultiPart::alternative_plain_html(
                format!("Hello,\n\nhttp://127.0.0.1:8080/confirm/tok.en-{n}_x\n"),
                format!("<p><a href=\"http://127.0.0.1:8080/confirm/tok.en-{n}_x\">go</a></p>"),
            ))?)
    }

    #[tokio::test]
    async fn an_accepted_mail_is_captured_and_parsed() -> TestResult {
        let server = SmtpServer::start();
        transport(&server).send(message(1)?).await?;
        let mails = server.wait_for_mails(1, Duration::from_secs(5)).await;
        assert_eq!(mails.len(), 1);
        let mail = &mails[0];
        assert_eq!(mail.from, "no-reply@localhost");
        assert_eq!(mail.to, vec!["alice1@example.com".to_owned()]);
        assert_eq!(mail.subject, "Confirm your address 1");
        assert!(mail.text.starts_with("Hello,"), "{}", mail.text);
        assert!(mail.html.contains("<a href="), "{}", mail.html);
        assert_eq!(
            mail.link.as_deref(),
            Some("http://127.0.0.1:8080/confirm/tok.en-1_x")
        );
        let stats = server.stats();
        assert_eq!(
            (stats.connections, stats.transactions, stats.accepted),
            (1, 1, 1)
        );
        Ok(())
    }

    #[tokio::test]
    async fn temp_fail_answers_451_and_perm_fail_550() -> TestResult {
        let server = SmtpServer::start();
        let mailer = transport(&server);

        server.set_mode(Mode::TempFail);
        let err = mailer.send(message(1)?).await.err().ok_or("451 expected")?;
        assert!(err.is_transient(), "{err}");
        assert_eq!(err.status().map(u16::from), Some(451));

        server.set_mode(Mode::PermFail);
        let err = mailer.send(message(2)?).await.err().ok_or("550 expected")?;
        assert!(err.is_permanent(), "{err}");
        assert_eq!(err.status().map(u16::from), Some(550));

        server.set_mode(Mode::Accept);
        mailer.send(message(3)?).await?;
        assert_eq!(server.count(), 1);
        assert_eq!(server.stats().rejected, 2);
        Ok(())
    }

    #[tokio::test]
    async fn a_stopped_server_refuses_connections_until_resumed() -> TestResult {
        let mut server = SmtpServer::start();
        let mailer = transport(&server);
        mailer.send(message(1)?).await?;

        server.stop();
        let refused = TcpStream::connect(server.addr)
            .err()
            .ok_or("still listening")?;
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
        // The pooled connection was cut too, so this send fails rather than slipping through.
        assert!(mailer.send(message(2)?).await.is_err());

        server.resume();
        let port = server.port();
        mailer.send(message(3)?).await?;
        assert_eq!(server.port(), port);
        assert_eq!(server.count(), 2);
        Ok(())
    }

    #[tokio::test]
    async fn a_hanging_server_answers_nothing_until_released() -> TestResult {
        let server = SmtpServer::start();
        let mailer = transport(&server);
        server.set_hang(true);
        let attempt = tokio::time::timeout(Duration::from_millis(300), mailer.send(message(1)?));
        assert!(attempt.await.is_err(), "the send should have timed out");
        server.set_hang(false);
        let fresh = transport(&server);
        fresh.send(message(2)?).await?;
        assert!(
            !server
                .wait_for_mails(1, Duration::from_secs(5))
                .await
                .is_empty()
        );
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_senders_are_all_captured() -> TestResult {
        let server = SmtpServer::start();
        let mailer = transport(&server);
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..16 {
            let mailer = mailer.clone();
            let messages = (0..25)
                .map(|i| message(t * 1000 + i))
                .collect::<Result<Vec<_>, _>>()?;
            tasks.spawn(async move {
                for m in messages {
                    mailer.send(m).await?;
                }
                Ok::<(), lettre::transport::smtp::Error>(())
            });
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        let elapsed = started.elapsed();
        assert_eq!(server.count(), 400);
        eprintln!(
            "400 mails in {elapsed:?} ({:.0}/s) over {} connections",
            400.0 / elapsed.as_secs_f64(),
            server.stats().connections
        );
        let mails = server.mails();
        assert!(mails.iter().all(|m| m.link.is_some()));
        Ok(())
    }
}
