//! The server against a real SMTP client (lettre, as the worker uses it):
//! capture, refusals, stop and resume, hang, and many senders at once.

use std::io;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use lettre::message::{Mailbox, MultiPart};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::{Mode, SmtpServer};

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
