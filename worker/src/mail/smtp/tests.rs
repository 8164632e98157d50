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
    assert_eq!(
        dot_stuffed(b"no dots\r\n").as_deref(),
        Some("no dots\r\n\r\n.\r\n")
    );
    assert_eq!(dot_stuffed(b"\xff"), None);
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
