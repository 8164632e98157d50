//! `verimail-bench smtp-sink`: an SMTP server that accepts every mail and
//! keeps nothing, like Postfix's `smtp-sink`, but able to offer `CHUNKING`
//! (RFC 3030), which `smtp-sink` does not implement and Postfix's own
//! `smtpd` (3.4 and later), Exchange and Gmail offer. It lets the bench
//! measure the worker's one-round-trip `BDAT` exchange beside the two round
//! trips of `DATA` (`--no-chunking`), against the same server code.
//!
//! Replies to pipelined commands are collected and written once no complete
//! command is left in what was read, so a pipelined group is answered in one
//! write, as Postfix's servers do (a chunk that straddles reads is answered
//! when its last byte arrives). A `BDAT` chunk is read by its stated size
//! whatever was answered before it (RFC 3030, 4.2).

use std::io;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Serves `listen` until the process is stopped.
pub(crate) async fn run(listen: &str, chunking: bool) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    println!(
        "smtp sink on {listen} (PIPELINING{})",
        if chunking { ", CHUNKING" } else { "" }
    );
    loop {
        let (socket, _) = listener.accept().await?;
        tokio::spawn(async move {
            // A client that goes away mid-session is not the sink's concern.
            let _ = session(socket, chunking).await;
        });
    }
}

/// Where in a session the next bytes belong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Command lines.
    Commands,
    /// `DATA`'s content, up to the line holding a single dot.
    Data,
    /// A `BDAT` chunk's bytes still to come.
    Chunk { left: usize },
}

/// One session's protocol, apart from its socket.
struct Session {
    state: State,
    ehlo: &'static [u8],
    chunking: bool,
}

impl Session {
    fn new(chunking: bool) -> Self {
        let ehlo: &[u8] = if chunking {
            b"250-verimail-bench sink\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"
        } else {
            b"250-verimail-bench sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"
        };
        Self {
            state: State::Commands,
            ehlo,
            chunking,
        }
    }

    /// Reads what it can of `input`, adding each reply to `replies`; answers
    /// how many bytes it is done with (the rest must be given again, with
    /// more, next time) and whether the client said `QUIT`.
    fn feed(&mut self, input: &[u8], replies: &mut Vec<u8>) -> (usize, bool) {
        let mut at = 0;
        loop {
            match self.state {
                State::Commands => {
                    let Some(end) = memchr::memmem::find(&input[at..], b"\r\n") else {
                        return (at, false);
                    };
                    let line = &input[at..at + end];
                    at += end + 2;
                    let verb = line.get(..4).unwrap_or(line).to_ascii_uppercase();
                    match verb.as_slice() {
                        b"EHLO" => replies.extend_from_slice(self.ehlo),
                        b"HELO" => replies.extend_from_slice(b"250 verimail-bench sink\r\n"),
                        b"MAIL" => replies.extend_from_slice(b"250 2.1.0 Ok\r\n"),
                        b"RCPT" => replies.extend_from_slice(b"250 2.1.5 Ok\r\n"),
                        b"DATA" => {
                            replies.extend_from_slice(b"354 End data with <CR><LF>.<CR><LF>\r\n");
                            // The search for the terminator starts at this
                            // line's own CRLF, so an empty message's ".\r\n" ends it.
                            at -= 2;
                            self.state = State::Data;
                        }
                        b"BDAT" if self.chunking => {
                            let size = std::str::from_utf8(line)
                                .ok()
                                .and_then(|l| l.split_whitespace().nth(1))
                                .and_then(|n| n.parse().ok());
                            match size {
                                Some(left) => self.state = State::Chunk { left },
                                None => replies
                                    .extend_from_slice(b"501 5.5.4 Syntax: BDAT count [LAST]\r\n"),
                            }
                        }
                        b"RSET" | b"NOOP" => replies.extend_from_slice(b"250 2.0.0 Ok\r\n"),
                        b"QUIT" => {
                            replies.extend_from_slice(b"221 2.0.0 Bye\r\n");
                            return (at, true);
                        }
                        _ => replies
                            .extend_from_slice(b"502 5.5.2 Error: command not recognized\r\n"),
                    }
                }
                State::Data => match memchr::memmem::find(&input[at..], b"\r\n.\r\n") {
                    Some(end) => {
                        at += end + 5;
                        replies.extend_from_slice(b"250 2.0.0 Ok: queued\r\n");
                        self.state = State::Commands;
                    }
                    // Done with all but the last 4 bytes: the terminator may
                    // straddle reads.
                    None => return (at.max(input.len().saturating_sub(4)), false),
                },
                State::Chunk { left } => {
                    let take = left.min(input.len() - at);
                    at += take;
                    if take < left {
                        self.state = State::Chunk { left: left - take };
                        return (at, false);
                    }
                    replies.extend_from_slice(b"250 2.0.0 Ok: queued\r\n");
                    self.state = State::Commands;
                }
            }
        }
    }
}

async fn session(mut socket: TcpStream, chunking: bool) -> io::Result<()> {
    // Replies are written whole, once per group: Nagle would hold back the
    // next group's behind an unacknowledged one.
    socket.set_nodelay(true)?;
    socket
        .write_all(b"220 verimail-bench sink ESMTP\r\n")
        .await?;
    let mut protocol = Session::new(chunking);
    let mut input = Vec::with_capacity(64 * 1024);
    let mut replies = Vec::with_capacity(512);
    loop {
        let (done, quit) = protocol.feed(&input, &mut replies);
        input.drain(..done);
        if !replies.is_empty() {
            socket.write_all(&replies).await?;
            replies.clear();
        }
        if quit || socket.read_buf(&mut input).await? == 0 {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session's input in pieces of `step` bytes, as the socket loop feeds
    /// it: the replies, and whether QUIT ended it.
    fn replies(script: &[u8], step: usize) -> (String, bool) {
        let mut protocol = Session::new(true);
        let (mut input, mut replies) = (Vec::new(), Vec::new());
        for piece in script.chunks(step) {
            input.extend_from_slice(piece);
            let (done, quit) = protocol.feed(&input, &mut replies);
            input.drain(..done);
            if quit {
                return (String::from_utf8_lossy(&replies).into_owned(), true);
            }
        }
        (String::from_utf8_lossy(&replies).into_owned(), false)
    }

    const SCRIPT: &[u8] = b"EHLO x\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n\
        ..stuffed\r\nBDAT 5 LAST\r\n.\r\n\
        MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n.\r\n\
        MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nBDAT 12 LAST\r\nQUIT\r\n.\r\n.\r\n\
        BDAT 0 LAST\r\nBDAT x\r\nVRFY\r\nQUIT\r\n";

    #[test]
    fn every_mail_is_answered_once_however_the_input_is_cut() {
        let whole = replies(SCRIPT, SCRIPT.len());
        let expected = [
            "250-verimail-bench sink",
            "250-PIPELINING",
            "250-CHUNKING",
            "250-8BITMIME",
            "250 ENHANCEDSTATUSCODES",
            // DATA with lines that look like commands and a stuffed dot.
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
            "354 End data with <CR><LF>.<CR><LF>",
            "250 2.0.0 Ok: queued",
            // An empty message: the terminator right after DATA.
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
            "354 End data with <CR><LF>.<CR><LF>",
            "250 2.0.0 Ok: queued",
            // A chunk holding a QUIT line and dots: read as data, by size.
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
            "250 2.0.0 Ok: queued",
            // An empty chunk, a size that is not a number, an unknown command.
            "250 2.0.0 Ok: queued",
            "501 5.5.4 Syntax: BDAT count [LAST]",
            "502 5.5.2 Error: command not recognized",
            "221 2.0.0 Bye",
        ]
        .map(|l| format!("{l}\r\n"))
        .concat();
        assert_eq!(whole, (expected, true));
        for step in [1, 2, 3, 4, 5, 7, 13] {
            assert_eq!(replies(SCRIPT, step), whole, "fed {step} bytes at a time");
        }
    }

    #[test]
    fn without_chunking_bdat_is_an_unknown_command() {
        let mut protocol = Session::new(false);
        let mut out = Vec::new();
        let (done, quit) = protocol.feed(b"EHLO x\r\nBDAT 3 LAST\r\n", &mut out);
        assert_eq!((done, quit), (21, false));
        let out = String::from_utf8_lossy(&out);
        assert!(!out.contains("CHUNKING"), "{out}");
        assert!(
            out.ends_with("502 5.5.2 Error: command not recognized\r\n"),
            "{out}"
        );
    }
}
