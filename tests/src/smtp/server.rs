//! The listener and the handle a test holds: start on port 0, the knobs a
//! test turns (mode, refusals, hang), stop and resume on the same port, and
//! the mails and counters read back. What is said on a connection is in
//! `session`.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::capture::{CapturedMail, RawMail};
use super::session::serve_connection;
use super::{Mode, Stats, Step, lock};

/// State shared by the acceptor, every session and the test.
#[derive(Default)]
pub(super) struct Shared {
    /// A [`Mode`] as u8, read on every `RCPT`.
    pub(super) mode: AtomicU8,
    /// While set, sessions read but never answer (timeout tests).
    pub(super) hang: AtomicBool,
    /// Cleared by `stop`: the acceptor exits and sessions give up hanging.
    pub(super) accepting: AtomicBool,
    pub(super) mails: Mutex<Vec<RawMail>>,
    pub(super) connections: AtomicU64,
    pub(super) transactions: AtomicU64,
    pub(super) rejected: AtomicU64,
    /// Clones of live session sockets, so `stop` can cut them: a pooled client
    /// must not keep delivering through a server that is "down".
    pub(super) open: Mutex<HashMap<u64, TcpStream>>,
    pub(super) next_id: AtomicU64,
    /// Replies a test set for a step, instead of the usual one.
    pub(super) refusals: Mutex<HashMap<Step, (u16, String)>>,
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
