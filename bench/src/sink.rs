//! `verimail-bench smtp-sink`: an SMTP server that accepts every mail and
//! keeps nothing, like Postfix's `smtp-sink`, but able to offer `CHUNKING`
//! (RFC 3030), which `smtp-sink` does not implement and Postfix's own
//! `smtpd` (3.4 and later), Exchange and Gmail offer. It lets the bench
//! measure the worker's one-round-trip `BDAT` exchange beside the two round
//! trips of `DATA` (`--no-chunking`), against the same server code.
//!
//! It behaves as `smtp-sink` does where a client can tell: replies to
//! pipelined commands are written together once no complete command is left
//! in what was read (one write per group, as Postfix's servers do), every
//! command gets an enhanced status code, and a `BDAT` chunk is read by its
//! stated size whatever was answered before it (RFC 3030, 4.2).

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
enum State {
    /// Command lines.
    Commands,
    /// `DATA`'s content, up to the line holding a single dot.
    Data,
    /// A `BDAT` chunk's bytes still to come.
    Chunk { left: usize },
}

async fn session(mut socket: TcpStream, chunking: bool) -> io::Result<()> {
    // Replies are written whole, once per group: Nagle would hold back the
    // next group's behind an unacknowledged one.
    socket.set_nodelay(true)?;
    socket
        .write_all(b"220 verimail-bench sink ESMTP\r\n")
        .await?;
    let ehlo: &[u8] = if chunking {
        b"250-verimail-bench sink\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"
    } else {
        b"250-verimail-bench sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"
    };
    let mut input = Vec::with_capacity(64 * 1024);
    let mut replies = Vec::with_capacity(512);
    let mut state = State::Commands;
    loop {
        let mut at = 0;
        loop {
            match state {
                State::Commands => {
                    let Some(end) = memchr::memmem::find(&input[at..], b"\r\n") else {
                        break;
                    };
                    let line = &input[at..at + end];
                    at += end + 2;
                    let verb = line.get(..4).unwrap_or(line).to_ascii_uppercase();
                    match verb.as_slice() {
                        b"EHLO" => replies.extend_from_slice(ehlo),
                        b"HELO" => replies.extend_from_slice(b"250 verimail-bench sink\r\n"),
                        b"MAIL" => replies.extend_from_slice(b"250 2.1.0 Ok\r\n"),
                        b"RCPT" => replies.extend_from_slice(b"250 2.1.5 Ok\r\n"),
                        b"DATA" => {
                            replies.extend_from_slice(b"354 End data with <CR><LF>.<CR><LF>\r\n");
                            // The search for the terminator starts at this
                            // line's own CRLF, so an empty message's ".\r\n" ends it.
                            at -= 2;
                            state = State::Data;
                        }
                        b"BDAT" if chunking => {
                            let size = std::str::from_utf8(line)
                                .ok()
                                .and_then(|l| l.split_whitespace().nth(1))
                                .and_then(|n| n.parse().ok());
                            match size {
                                Some(left) => state = State::Chunk { left },
                                None => replies
                                    .extend_from_slice(b"501 5.5.4 Syntax: BDAT count [LAST]\r\n"),
                            }
                        }
                        b"RSET" | b"NOOP" => replies.extend_from_slice(b"250 2.0.0 Ok\r\n"),
                        b"QUIT" => {
                            replies.extend_from_slice(b"221 2.0.0 Bye\r\n");
                            return socket.write_all(&replies).await;
                        }
                        _ => replies
                            .extend_from_slice(b"502 5.5.2 Error: command not recognized\r\n"),
                    }
                }
                State::Data => match memchr::memmem::find(&input[at..], b"\r\n.\r\n") {
                    Some(end) => {
                        at += end + 5;
                        replies.extend_from_slice(b"250 2.0.0 Ok: queued\r\n");
                        state = State::Commands;
                    }
                    None => {
                        // Keep the last bytes: the terminator may straddle reads.
                        at = at.max(input.len().saturating_sub(4));
                        break;
                    }
                },
                State::Chunk { left } => {
                    let take = left.min(input.len() - at);
                    at += take;
                    if take < left {
                        state = State::Chunk { left: left - take };
                        break;
                    }
                    replies.extend_from_slice(b"250 2.0.0 Ok: queued\r\n");
                    state = State::Commands;
                }
            }
        }
        input.drain(..at);
        if !replies.is_empty() {
            socket.write_all(&replies).await?;
            replies.clear();
        }
        if socket.read_buf(&mut input).await? == 0 {
            return Ok(());
        }
    }
}
