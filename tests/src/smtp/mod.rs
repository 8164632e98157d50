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
//!
//! The rooms: `server` holds the listener and what a test turns (stop,
//! resume, hang, refusals), `session` speaks SMTP on one connection and decides
//! each reply, `capture` turns what was accepted into [`CapturedMail`].

mod capture;
mod server;
mod session;
#[cfg(test)]
mod tests;

use std::sync::{Mutex, MutexGuard, PoisonError};

pub use capture::{CapturedMail, first_confirm_link, mail_request};
pub use server::SmtpServer;

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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking session thread must not take every later assertion down with it.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
