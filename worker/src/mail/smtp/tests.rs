//! The pool and the pipelined exchange against the in-test SMTP server.

use std::sync::Arc;
use std::time::Instant;

use super::*;
use crate::mail::test_support::{TestResult, config, envelope, mail, mailer};
use crate::mail::{Classification, Mailer, Refusal};
use verimail_tests::smtp::SmtpServer;

#[test]
fn dot_stuffing_adds_a_dot_to_each_line_that_starts_with_one() {
    assert_eq!(
        dot_stuffed(b".a\r\n..b\r\nc.\r\n.\r\n.").as_deref(),
        Some("..a\r\n...b\r\nc.\r\n..\r\n..\r\n.\r\n")
    );
    // A message that ends its last line gets no empty line before the dot.
    assert_eq!(
        dot_stuffed(b"no dots\r\n").as_deref(),
        Some("no dots\r\n.\r\n")
    );
    assert_eq!(dot_stuffed(b"").as_deref(), Some("\r\n.\r\n"));
    assert_eq!(dot_stuffed(b"\xff"), None);
}

#[test]
fn a_chunk_states_its_size_and_ends_its_last_line() {
    let group = "MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\n".to_owned();
    assert_eq!(
        chunked(group.clone(), ".a\r\nb\r\n"),
        "MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nBDAT 7 LAST\r\n.a\r\nb\r\n"
    );
    // No final CRLF: the chunk gets the one DATA's terminator would add.
    assert_eq!(
        chunked(group, "no end"),
        "MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nBDAT 8 LAST\r\nno end\r\n"
    );
    // Multi-byte text: the size counts bytes.
    assert!(chunked(String::new(), "确认\r\n").starts_with("BDAT 8 LAST\r\n"));
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

/// A scripted server that offers PIPELINING (the test server does not), and
/// CHUNKING when given the reply to an accepted chunk: a `RCPT` for a
/// `nobody…@` address gets `rcpt_reply`, one for a `vanish…@` address closes
/// the connection unanswered, any other gets `250 ok`. Counts connections
/// and accepted mails, and notes whether `RCPT` and `DATA` (or `BDAT`) had
/// arrived before `MAIL` was answered. A `BDAT` chunk is read by its stated
/// size whatever was answered before, as RFC 3030 asks of a server.
struct Pipeliner {
    port: u16,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    mails: Arc<std::sync::atomic::AtomicUsize>,
    pipelined: Arc<std::sync::atomic::AtomicBool>,
    /// Chunks or messages read with the next command already behind them:
    /// transactions that came in one write with the one before.
    batched: Arc<std::sync::atomic::AtomicUsize>,
    /// Each accepted mail's DATA, as it came over the wire (terminator
    /// included), or its BDAT chunk.
    bodies: Arc<Mutex<Vec<String>>>,
    /// Commands seen, by verb (`BDAT`, `DATA`, and anything unknown as `?`).
    verbs: Arc<Mutex<Vec<String>>>,
}

impl Pipeliner {
    async fn start(rcpt_reply: &'static str) -> Result<Self, std::io::Error> {
        Self::serve(rcpt_reply, None).await
    }

    async fn serve(
        rcpt_reply: &'static str,
        chunk_reply: Option<&'static str>,
    ) -> Result<Self, std::io::Error> {
        let chunking = chunk_reply.is_some();
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let connections = Arc::new(AtomicUsize::new(0));
        let mails = Arc::new(AtomicUsize::new(0));
        let pipelined = Arc::new(AtomicBool::new(false));
        let batched = Arc::new(AtomicUsize::new(0));
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let verbs = Arc::new(Mutex::new(Vec::new()));
        let (c, m, p, b, v, n) = (
            connections.clone(),
            mails.clone(),
            pipelined.clone(),
            bodies.clone(),
            verbs.clone(),
            batched.clone(),
        );
        let ehlo = if chunking {
            "250-pipeliner\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 8BITMIME\r\n"
        } else {
            "250-pipeliner\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
        };
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let (m, p, b, v, n) = (m.clone(), p.clone(), b.clone(), v.clone(), n.clone());
                tokio::spawn(async move {
                    // As real servers do: a reply written while the one
                    // before is unacknowledged must not wait for the ACK.
                    socket.set_nodelay(true)?;
                    let (read, mut write) = socket.into_split();
                    let mut read = BufReader::new(read);
                    let mut line = String::new();
                    let mut rcpt_ok = false;
                    // A transaction is open from MAIL until its message is
                    // accepted or RSET; a refused one stays open, as it does
                    // on servers that keep the sender after a refused DATA.
                    let mut open = false;
                    write.write_all(b"220 pipeliner\r\n").await?;
                    loop {
                        line.clear();
                        if read.read_line(&mut line).await? == 0 {
                            return Ok::<(), std::io::Error>(());
                        }
                        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
                        lock(&v).push(verb.clone());
                        let reply: &str = match verb.as_str() {
                            "EHLO" => ehlo,
                            "MAIL" if open => "503 5.5.1 nested MAIL command\r\n",
                            "MAIL" => {
                                if !read.buffer().is_empty() {
                                    p.store(true, Ordering::SeqCst);
                                }
                                open = true;
                                "250 ok\r\n"
                            }
                            // A server that dies mid-session: no reply,
                            // the socket closed with the rest of the write
                            // unread.
                            "RCPT" if line.to_ascii_lowercase().contains("<vanish") => {
                                return Ok(());
                            }
                            "RCPT" => {
                                let reply = if line.to_ascii_lowercase().contains("<nobody") {
                                    rcpt_reply
                                } else {
                                    "250 ok\r\n"
                                };
                                rcpt_ok = reply.starts_with('2');
                                reply
                            }
                            "DATA" if rcpt_ok => {
                                write.write_all(b"354 go on\r\n").await?;
                                let mut body = String::new();
                                while !body.ends_with("\r\n.\r\n") {
                                    if read.read_line(&mut body).await? == 0 {
                                        return Ok(());
                                    }
                                }
                                if !read.buffer().is_empty() {
                                    n.fetch_add(1, Ordering::SeqCst);
                                }
                                m.fetch_add(1, Ordering::SeqCst);
                                lock(&b).push(body);
                                open = false;
                                "250 queued\r\n"
                            }
                            "DATA" => "554 no valid recipients\r\n",
                            "BDAT" if chunking => {
                                // "BDAT <size> LAST": the chunk is read in
                                // full whatever the reply will be.
                                let size: usize = line
                                    .split_whitespace()
                                    .nth(1)
                                    .and_then(|n| n.parse().ok())
                                    .unwrap_or(0);
                                let mut chunk = vec![0; size];
                                read.read_exact(&mut chunk).await?;
                                if !read.buffer().is_empty() {
                                    n.fetch_add(1, Ordering::SeqCst);
                                }
                                let accepted = chunk_reply.unwrap_or("250 2.0.0 queued\r\n");
                                if rcpt_ok && accepted.starts_with('2') {
                                    open = false;
                                    m.fetch_add(1, Ordering::SeqCst);
                                    lock(&b).push(String::from_utf8_lossy(&chunk).into_owned());
                                    accepted
                                } else if rcpt_ok {
                                    accepted
                                } else {
                                    "554 5.5.1 no valid recipients\r\n"
                                }
                            }
                            "QUIT" => {
                                write.write_all(b"221 bye\r\n").await?;
                                return Ok(());
                            }
                            "RSET" => {
                                open = false;
                                "250 ok\r\n"
                            }
                            "NOOP" => "250 ok\r\n",
                            _ => {
                                lock(&v).push("?".into());
                                "500 5.5.2 unknown command\r\n"
                            }
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
            batched,
            bodies,
            verbs,
        })
    }

    /// How many commands with this verb arrived.
    fn seen(&self, verb: &str) -> usize {
        lock(&self.verbs).iter().filter(|v| *v == verb).count()
    }

    fn count(counter: &std::sync::atomic::AtomicUsize) -> usize {
        counter.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test]
async fn a_pipelining_server_gets_commands_in_one_write_on_one_reused_connection() -> TestResult {
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
async fn pipelined_refusals_keep_their_classification_and_the_session_in_step() -> TestResult {
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
    // Every reply was read (DATA's 554 too), so the session stayed in step:
    // the next mails use it, and each gets its own answer.
    let err = m.send(&to, &mail()).await.err().ok_or("550 expected")?;
    assert_eq!(
        err.classification(),
        Classification::RecipientRejected,
        "{err}"
    );
    m.send(&envelope(None, "alice@example.com"), &mail())
        .await?;
    assert_eq!(Pipeliner::count(&server.connections), 1);
    assert_eq!(Pipeliner::count(&server.mails), 1);

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

#[tokio::test]
async fn a_chunking_server_gets_each_mail_in_one_write_as_one_bdat_chunk() -> TestResult {
    let server = Pipeliner::serve("250 ok\r\n", Some("250 2.0.0 queued\r\n")).await?;
    let m = mailer(&format!("smtp+plain://127.0.0.1:{}", server.port))?;
    let mut dotted = mail();
    dotted.text = "Hello,\n.a line that starts with a dot\n.\nend\n".into();
    for _ in 0..3 {
        m.send(&envelope(Some("Alice"), "alice@example.com"), &dotted)
            .await?;
    }
    assert_eq!(Pipeliner::count(&server.mails), 3);
    assert_eq!(Pipeliner::count(&server.connections), 1);
    assert_eq!((server.seen("BDAT"), server.seen("DATA")), (3, 0));
    assert_eq!(
        server.seen("?"),
        0,
        "no message line was taken for a command"
    );
    assert!(
        server.pipelined.load(std::sync::atomic::Ordering::SeqCst),
        "RCPT and BDAT were sent before MAIL's reply"
    );
    let bodies = lock(&server.bodies).clone();
    let body = bodies.first().ok_or("no mail")?;
    // A chunk is the message as it is: no dots added, no terminator.
    assert!(
        body.contains("\r\n.a line that starts with a dot\r\n.\r\nend"),
        "{body}"
    );
    assert!(
        body.ends_with("\r\n") && !body.ends_with("\r\n.\r\n"),
        "{body}"
    );
    let parsed = mail_parser::MessageParser::default()
        .parse(body.as_bytes())
        .ok_or("unparsable")?;
    assert_eq!(parsed.subject(), Some("请确认您的邮箱地址"));
    assert_eq!(
        parsed.body_text(0).as_deref(),
        Some("Hello,\r\n.a line that starts with a dot\r\n.\r\nend\r\n")
    );
    Ok(())
}

#[tokio::test]
async fn chunked_refusals_keep_their_classification_and_the_session_in_step() -> TestResult {
    let server =
        Pipeliner::serve("550 5.1.1 no such user\r\n", Some("250 2.0.0 queued\r\n")).await?;
    let m = mailer(&format!("smtp+plain://127.0.0.1:{}", server.port))?;
    let to = envelope(None, "nobody@example.com");
    for _ in 0..2 {
        let err = m.send(&to, &mail()).await.err().ok_or("550 expected")?;
        assert_recipient_refused(&err);
    }
    // Every reply of a refused transaction was read (its chunk's too), so
    // the session stayed in step and the next mail used it; the chunks were
    // read as data, never as commands.
    m.send(&envelope(None, "alice@example.com"), &mail())
        .await?;
    assert_eq!(Pipeliner::count(&server.connections), 1);
    assert_eq!(Pipeliner::count(&server.mails), 1);
    assert_eq!(server.seen("?"), 0);

    let server =
        Pipeliner::serve("452 4.2.2 mailbox full\r\n", Some("250 2.0.0 queued\r\n")).await?;
    let m = mailer(&format!("smtp+plain://127.0.0.1:{}", server.port))?;
    let err = m.send(&to, &mail()).await.err().ok_or("452 expected")?;
    assert_eq!(err.classification(), Classification::Transient, "{err}");

    // The recipient accepted, the chunk refused: a refusal of the message.
    let server = Pipeliner::serve("250 ok\r\n", Some("552 5.3.4 message too big\r\n")).await?;
    let m = mailer(&format!("smtp+plain://127.0.0.1:{}", server.port))?;
    let err = m.send(&to, &mail()).await.err().ok_or("552 expected")?;
    assert!(
        matches!(
            err,
            SendError::Smtp {
                step: SmtpStep::Data,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(server.seen("BDAT"), 1);
    assert_eq!(Pipeliner::count(&server.mails), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mails_waiting_for_a_connection_go_together_and_each_keeps_its_own_answer() -> TestResult {
    for chunking in [true, false] {
        waiting_mails_go_together(chunking).await?;
    }
    Ok(())
}

/// Sixty mails over two connections, every fifth refused.
async fn waiting_mails_go_together(chunking: bool) -> TestResult {
    let chunk_reply = chunking.then_some("250 2.0.0 queued\r\n");
    let server = Pipeliner::serve("550 5.1.1 no such user\r\n", chunk_reply).await?;
    let m = Arc::new(Mailer::from_config(&config(&[
        (
            "MAIL_URL",
            &format!("smtp+plain://127.0.0.1:{}", server.port),
        ),
        ("WORKER_CONCURRENCY", "2"),
    ])?)?);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..60 {
        let m = Arc::clone(&m);
        tasks.spawn(async move {
            // Every fifth recipient is refused, in the middle of the others.
            let to = if i % 5 == 4 {
                format!("nobody{i}@example.com")
            } else {
                format!("user{i}@example.com")
            };
            (i, m.send(&envelope(None, &to), &mail()).await)
        });
    }
    let (mut sent, mut refused) = (0, 0);
    while let Some(done) = tasks.join_next().await {
        let (i, result) = done?;
        if i % 5 == 4 {
            let err = result.err().ok_or("a refusal expected")?;
            assert_recipient_refused(&err);
            refused += 1;
        } else {
            result?;
            sent += 1;
        }
    }
    assert_eq!((sent, refused), (48, 12));
    // Each accepted mail arrived once, and no chunk was read as commands.
    assert_eq!(Pipeliner::count(&server.mails), 48);
    let bodies = lock(&server.bodies).clone();
    assert!(bodies.iter().all(|b| b.ends_with("\r\n")));
    assert_eq!(server.seen("?"), 0);
    let verbs = (server.seen("BDAT"), server.seen("DATA"));
    assert_eq!(verbs, if chunking { (60, 0) } else { (0, 60) });
    // Each refused transaction was reset before the next MAIL (the server
    // keeps a refused one open and would refuse a nested MAIL).
    assert!(server.seen("RSET") >= 12, "{} RSET", server.seen("RSET"));
    assert!(
        Pipeliner::count(&server.batched) > 0,
        "no transaction came in one write with the one before"
    );
    Ok(())
}

#[tokio::test]
async fn a_421_ends_the_session_and_the_next_mail_gets_a_new_one() -> TestResult {
    let server =
        Pipeliner::serve("421 4.3.2 shutting down\r\n", Some("250 2.0.0 queued\r\n")).await?;
    let pool = SmtpPool::new(SmtpSecurity::None, "127.0.0.1", server.port, None, 4)?;
    let message = b"Subject: hello\r\n\r\nhello\r\n";
    let refused = SmtpEnvelope::new(None, vec!["nobody@example.com".parse()?])?;
    let err = pool
        .send(&refused, message)
        .await
        .err()
        .ok_or("421 expected")?;
    assert_eq!(err.classification(), Classification::Transient, "{err}");
    let accepted = SmtpEnvelope::new(None, vec!["alice@example.com".parse()?])?;
    pool.send(&accepted, message).await?;
    assert_eq!(Pipeliner::count(&server.connections), 2);
    assert_eq!(Pipeliner::count(&server.mails), 1);
    Ok(())
}

/// `err` is the refusal of the `RCPT`, classified `recipient_rejected`.
fn assert_recipient_refused(err: &SendError) {
    assert!(
        matches!(
            err,
            SendError::Smtp {
                step: SmtpStep::Rcpt,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.classification(), Classification::RecipientRejected);
}

#[tokio::test]
async fn a_connection_that_breaks_mid_batch_answers_the_mails_before_and_leaves_the_rest_unanswered()
-> TestResult {
    for chunking in [true, false] {
        let chunk_reply = chunking.then_some("250 2.0.0 queued\r\n");
        let server = Pipeliner::serve("550 5.1.1 no such user\r\n", chunk_reply).await?;
        let pool = SmtpPool::new(SmtpSecurity::None, "127.0.0.1", server.port, None, 1)?;
        let mut conn = pool.checkout().await?;
        let to = |name: &str| -> Result<SmtpEnvelope, Box<dyn std::error::Error>> {
            Ok(SmtpEnvelope::new(
                None,
                vec![format!("{name}@example.com").parse()?],
            )?)
        };
        let envelopes = [
            to("first")?,
            to("nobody")?,
            to("second")?,
            to("vanish")?,
            to("never-read")?,
            to("never-read-either")?,
        ];
        let text = "Subject: hello\r\n\r\nhello\r\n";
        let mails: Vec<batch::Outgoing<'_>> = envelopes.iter().map(|e| (e, text)).collect();
        let exchanged = batch::exchange(&mut conn.smtp, &mails, chunking).await;
        let results = &exchanged.results;
        assert_eq!(results.len(), 6);
        // Answered before the break: each its own answer.
        assert!(results[0].is_ok(), "{chunking}: {:?}", results[0]);
        assert_recipient_refused(results[1].as_ref().err().ok_or("a refusal expected")?);
        assert!(results[2].is_ok(), "{chunking}: {:?}", results[2]);
        // The mail the server died on, and the ones written behind it: none
        // reported sent or refused, all to be tried again.
        for result in &results[3..] {
            let err = result.as_ref().err().ok_or("a failure expected")?;
            assert_eq!(err.classification(), Classification::Transient, "{err}");
        }
        assert!(
            matches!(results[4], Err(SendError::Unanswered))
                && matches!(results[5], Err(SendError::Unanswered)),
            "{chunking}: {results:?}"
        );
        assert!(!exchanged.reusable, "a broken connection is not kept");
        assert_eq!(Pipeliner::count(&server.mails), 2);
        // The pool opens a new session for the next mail.
        pool.send(&to("retried")?, text.as_bytes()).await?;
        assert_eq!(Pipeliner::count(&server.connections), 2);
        assert_eq!(Pipeliner::count(&server.mails), 3);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_break_mid_batch_every_mail_is_sent_once_when_its_failures_are_retried()
-> TestResult {
    for chunking in [true, false] {
        let chunk_reply = chunking.then_some("250 2.0.0 queued\r\n");
        let server = Pipeliner::serve("550 5.1.1 no such user\r\n", chunk_reply).await?;
        let pool = Arc::new(SmtpPool::new(
            SmtpSecurity::None,
            "127.0.0.1",
            server.port,
            None,
            1,
        )?);
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..40 {
            let pool = Arc::clone(&pool);
            tasks.spawn(async move {
                // Three mails whose RCPT the server dies on, amid the others.
                let name = if i % 13 == 6 {
                    format!("vanish{i}")
                } else {
                    format!("user{i}")
                };
                let envelope =
                    SmtpEnvelope::new(None, vec![format!("{name}@example.com").parse()?])?;
                let message = format!("Subject: {name}\r\n\r\nhello\r\n");
                // What a delivery does: a transient failure is tried again,
                // here at once (the worker waits with backoff).
                let mut failures = 0;
                while let Err(err) = pool.send(&envelope, message.as_bytes()).await {
                    assert_eq!(err.classification(), Classification::Transient, "{err}");
                    failures += 1;
                    if name.starts_with("vanish") && failures == 3 {
                        return Ok::<_, Box<dyn std::error::Error + Send + Sync>>((name, false));
                    }
                }
                Ok((name, true))
            });
        }
        let mut sent = Vec::new();
        while let Some(done) = tasks.join_next().await {
            let (name, ok) = done?.map_err(|e| e.to_string())?;
            assert_eq!(ok, !name.starts_with("vanish"), "{name}");
            if ok {
                sent.push(name);
            }
        }
        assert_eq!(sent.len(), 37);
        // Every mail reported sent arrived, and none arrived twice.
        let mut arrived: Vec<String> = lock(&server.bodies)
            .iter()
            .filter_map(|b| {
                b.lines()
                    .next()?
                    .strip_prefix("Subject: ")
                    .map(str::to_owned)
            })
            .collect();
        arrived.sort();
        sent.sort();
        assert_eq!(arrived, sent, "chunking: {chunking}");
        // A session broke (and was replaced) at least once; mails behind a
        // vanishing one in its write failed unanswered and were retried.
        assert!(Pipeliner::count(&server.connections) >= 2);
    }
    Ok(())
}
