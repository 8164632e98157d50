//! One SMTP connection: `mailin`'s state machine fed line by line on its own
//! thread, and the handler that decides each reply from what the test set
//! (mode, refusals, hang) and stores every accepted mail.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{IpAddr, Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::Duration;

use mailin::{Action, AuthMechanism, Handler, Response, SessionBuilder};

use super::capture::RawMail;
use super::server::Shared;
use super::{Mode, Step, lock};

pub(super) fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
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
