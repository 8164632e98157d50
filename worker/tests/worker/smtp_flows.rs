//! The worker against the test SMTP server (fault injection).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use time::OffsetDateTime;
use verimail_shared::bus::{HEADER_DETAIL, HEADER_REASON, header_str};
use verimail_shared::token::{Keys, Signer};
use verimail_tests::smtp::{Mode, SmtpServer, Step};

use crate::support::{SECRET, TestEnv, request, user};

const WAIT: Duration = Duration::from_secs(20);

async fn env_with(smtp: &SmtpServer) -> Result<TestEnv> {
    let mut env = TestEnv::new().await?;
    env.set("MAIL_URL", smtp.mail_url());
    Ok(env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mail_over_smtp_carries_a_link_whose_token_verifies() -> Result<()> {
    let smtp = SmtpServer::start();
    let env = env_with(&smtp).await?;
    let capture = env.capture().await?;
    let worker = env.start_worker().await?;

    let req = request(&user(), "alice@example.com");
    let id = req["id"].as_str().context("id")?.to_owned();
    env.publish(&req).await?;
    let outcome = capture.outcome_of(&id, WAIT).await?;
    assert_eq!(outcome["type"], "verimail.verification.sent");
    let mails = smtp.wait_for_mails(1, WAIT).await;
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0].to, vec!["alice@example.com".to_owned()]);
    let link = mails[0].link.clone().context("a confirm link")?;
    let token = link
        .strip_prefix("https://verify.example.com/confirm/")
        .context("link on PUBLIC_BASE_URL")?;
    let keys = Keys::new(
        SECRET.to_owned().into(),
        Vec::new(),
        "email-confirm".to_owned(),
    );
    let signer = Signer::new(&keys, verimail_shared::token::Digest::Sha1);
    let claims = signer.verify_v1(token, OffsetDateTime::now_utc())?;
    assert_eq!(claims.request_id, id);
    assert_eq!(claims.email, "alice@example.com");
    assert_eq!(
        verimail_shared::events::rfc3339::format(claims.expires_at),
        outcome["data"]["expires_at"].as_str().unwrap_or_default()
    );

    worker.stop().await?;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_smtp_refusal_fails_with_recipient_rejected_and_frees_the_throttle()
-> Result<()> {
    let smtp = SmtpServer::start();
    smtp.set_mode(Mode::PermFail);
    let env = env_with(&smtp).await?;
    let capture = env.capture().await?;
    let worker = env.start_worker().await?;

    let uid = user();
    let req = request(&uid, "nobody@example.com");
    env.publish(&req).await?;
    let o = capture
        .outcome_of(req["id"].as_str().context("id")?, WAIT)
        .await?;
    assert_eq!(o["type"], "verimail.verification.failed");
    assert_eq!(o["data"]["reason"], "recipient_rejected", "{o}");
    assert!(env.drain_dead().await?.is_empty(), "nothing to replay");

    // No mail went out, so the user is not throttled.
    smtp.set_mode(Mode::Accept);
    let next = request(&uid, "somebody@example.com");
    env.publish(&next).await?;
    let o = capture
        .outcome_of(next["id"].as_str().context("id")?, WAIT)
        .await?;
    assert_eq!(o["type"], "verimail.verification.sent", "{o}");

    worker.stop().await?;
    env.cleanup().await;
    Ok(())
}

/// A refusal of the recipient ends `recipient_rejected` and (with
/// `SUPPRESS_ON_REJECT`'s default) puts the address on the suppression list;
/// a refusal of the sender, of our credentials or by policy ends
/// `delivery_failed` at once, dead-lettered for replay, with a detail saying
/// which, and never suppresses the recipient.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_refusals_are_told_apart_by_step_and_enhanced_code() -> Result<()> {
    let cases = [
        (
            Step::Rcpt,
            550,
            "5.1.1 No such user",
            "recipient_rejected",
            "",
        ),
        (
            Step::Rcpt,
            550,
            "5.7.1 Relaying denied",
            "delivery_failed",
            "policy refused: ",
        ),
        (
            Step::Auth,
            535,
            "5.7.8 Bad credentials",
            "delivery_failed",
            "authentication refused: ",
        ),
        (
            Step::Mail,
            553,
            "5.1.8 Sender rejected",
            "delivery_failed",
            "sender refused: ",
        ),
    ];
    for (step, code, text, reason, detail) in cases {
        let smtp = SmtpServer::start();
        smtp.refuse(step, code, text);
        let mut env = TestEnv::new().await?;
        let port = smtp.port();
        // Credentials only where the server offers AUTH: lettre refuses to
        // authenticate with a server that does not.
        let credentials = if step == Step::Auth {
            "user:secret@"
        } else {
            ""
        };
        env.set(
            "MAIL_URL",
            format!("smtp+plain://{credentials}127.0.0.1:{port}"),
        );
        let capture = env.capture().await?;
        let worker = env.start_worker().await?;

        let req = request(&user(), "someone@example.com");
        let id = req["id"].as_str().context("id")?.to_owned();
        env.publish(&req).await?;
        let o = capture.outcome_of(&id, WAIT).await?;
        assert_eq!(o["type"], "verimail.verification.failed", "{step:?}: {o}");
        assert_eq!(o["data"]["reason"], reason, "{step:?}: {o}");
        let got = o["data"]["detail"].as_str().unwrap_or_default();
        assert!(
            got.starts_with(detail) && got.contains(text),
            "{step:?}: {got}"
        );
        if reason == "delivery_failed" {
            let dead = env.wait_for_dead(1, WAIT).await?;
            ensure!(
                dead.len() == 1,
                "{step:?}: one dead letter, got {}",
                dead.len()
            );
            let headers = dead[0].properties.headers().as_ref();
            assert_eq!(header_str(headers, HEADER_REASON).as_deref(), Some(reason));
            let dead_detail = header_str(headers, HEADER_DETAIL).unwrap_or_default();
            assert!(dead_detail.starts_with(detail), "{dead_detail}");
        } else {
            assert!(env.drain_dead().await?.is_empty(), "nothing to replay");
        }
        assert_eq!(smtp.count(), 0);
        let pool = env.pool().await?;
        let entry: Option<(String, String, Option<String>)> = sqlx::query_as(
            "SELECT reason, source, detail FROM suppressions WHERE email = 'someone@example.com'",
        )
        .fetch_optional(&pool)
        .await?;
        pool.close().await;
        if reason == "recipient_rejected" {
            let (why, source, said) = entry.context("the refused recipient is suppressed")?;
            assert_eq!(
                (why.as_str(), source.as_str()),
                ("recipient_rejected", "worker")
            );
            assert!(said.unwrap_or_default().contains(text), "{step:?}");
        } else {
            assert_eq!(entry, None, "{step:?}: the recipient is not at fault");
        }

        worker.stop().await?;
        env.cleanup().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_suppress_on_reject_off_a_refused_recipient_stays_off_the_list() -> Result<()> {
    let smtp = SmtpServer::start();
    smtp.refuse(Step::Rcpt, 550, "5.1.1 No such user");
    let mut env = env_with(&smtp).await?;
    env.set("SUPPRESS_ON_REJECT", "false");
    let capture = env.capture().await?;
    let worker = env.start_worker().await?;
    let req = request(&user(), "gone@example.com");
    let o = {
        env.publish(&req).await?;
        capture
            .outcome_of(req["id"].as_str().context("id")?, WAIT)
            .await?
    };
    assert_eq!(o["data"]["reason"], "recipient_rejected", "{o}");
    let pool = env.pool().await?;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM suppressions")
        .fetch_one(&pool)
        .await?;
    assert_eq!(n, 0);
    pool.close().await;
    worker.stop().await?;
    env.cleanup().await;
    Ok(())
}

/// A suppressed address (any case) is answered `failed`/`suppressed`, naming
/// the reason, without a mail transaction and without taking the user's
/// throttle slot; once lifted, the address is mailed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suppressed_address_fails_without_a_mail_or_a_throttle_slot() -> Result<()> {
    let smtp = SmtpServer::start();
    let env = env_with(&smtp).await?;
    let capture = env.capture().await?;
    let worker = env.start_worker().await?;
    let pool = env.pool().await?;
    sqlx::query(
        "INSERT INTO suppressions (email, reason, source) VALUES ('Zed@Example.com', 'complaint', 'ses')",
    )
    .execute(&pool)
    .await?;

    let uid = user();
    let req = request(&uid, "zed@example.COM");
    env.publish(&req).await?;
    let o = capture
        .outcome_of(req["id"].as_str().context("id")?, WAIT)
        .await?;
    assert_eq!(o["type"], "verimail.verification.failed", "{o}");
    assert_eq!(o["data"]["reason"], "suppressed", "{o}");
    assert!(
        o["data"]["detail"]
            .as_str()
            .unwrap_or_default()
            .ends_with("complaint"),
        "{o}"
    );
    assert_eq!(smtp.stats().transactions, 0, "no mail transaction for it");
    let slots: i64 = sqlx::query_scalar("SELECT count(*) FROM throttle")
        .fetch_one(&pool)
        .await?;
    assert_eq!(slots, 0, "no throttle slot taken");

    // The same user, another address, at once: not throttled.
    let next = request(&uid, "yves@example.com");
    env.publish(&next).await?;
    let o = capture
        .outcome_of(next["id"].as_str().context("id")?, WAIT)
        .await?;
    assert_eq!(o["type"], "verimail.verification.sent", "{o}");

    // Lifted: mailed again.
    sqlx::query("DELETE FROM suppressions")
        .execute(&pool)
        .await?;
    let again = request(&user(), "zed@example.com");
    env.publish(&again).await?;
    let o = capture
        .outcome_of(again["id"].as_str().context("id")?, WAIT)
        .await?;
    assert_eq!(o["type"], "verimail.verification.sent", "{o}");
    assert_eq!(smtp.wait_for_mails(2, WAIT).await.len(), 2);
    pool.close().await;
    worker.stop().await?;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_smtp_failure_that_clears_sends_exactly_one_mail() -> Result<()> {
    let smtp = SmtpServer::start();
    smtp.set_mode(Mode::TempFail);
    let env = env_with(&smtp).await?;
    let capture = env.capture().await?;
    let worker = env.start_worker().await?;

    let req = request(&user(), "flaky@example.com");
    let id = req["id"].as_str().context("id")?.to_owned();
    env.publish(&req).await?;
    // Wait for the first attempt to give up and park the request in a retry queue.
    let pool = env.pool().await?;
    let deadline = Instant::now() + WAIT;
    loop {
        let parked: Option<bool> = sqlx::query_scalar(
            "SELECT attempts >= 1 AND lease_until IS NULL FROM requests WHERE id = $1",
        )
        .bind(&id)
        .fetch_optional(&pool)
        .await?;
        if parked == Some(true) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the request was never parked for a retry"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(smtp.stats().rejected >= 1);
    smtp.set_mode(Mode::Accept);

    let o = capture.outcome_of(&id, Duration::from_secs(30)).await?;
    assert_eq!(o["type"], "verimail.verification.sent", "{o}");
    assert_eq!(smtp.wait_for_mails(1, WAIT).await.len(), 1);
    let attempts: i32 = sqlx::query_scalar("SELECT attempts FROM requests WHERE id = $1")
        .bind(&id)
        .fetch_one(&pool)
        .await?;
    assert_eq!(attempts, 2);
    pool.close().await;
    assert_eq!(capture.outcomes_of(&id).len(), 1);
    assert_eq!(smtp.count(), 1);

    worker.stop().await?;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_an_in_flight_send_finish_and_returns_ok() -> Result<()> {
    let smtp = SmtpServer::start();
    smtp.set_mode(Mode::TempFail);
    let env = env_with(&smtp).await?;
    let worker = env.start_worker().await?;

    let req = request(&user(), "slow@example.com");
    let id = req["id"].as_str().context("id")?.to_owned();
    env.publish(&req).await?;
    // The send is in flight (retrying in process) once the server saw it.
    let deadline = Instant::now() + WAIT;
    while smtp.stats().rejected == 0 {
        ensure!(Instant::now() < deadline, "no send attempt");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    worker.stop().await?;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "stopped in {took:?}");

    // The in-flight delivery finished its work (parked for a retry, lease
    // given back) instead of being abandoned mid-way.
    let pool = env.pool().await?;
    let parked: bool = sqlx::query_scalar(
        "SELECT attempts = 1 AND lease_until IS NULL AND state = 'processing' FROM requests WHERE id = $1",
    )
    .bind(&id)
    .fetch_one(&pool)
    .await?;
    pool.close().await;
    assert!(parked);
    env.cleanup().await;
    Ok(())
}

/// A rough throughput figure (not a pass/fail test): `cargo test --release
/// -p verimail-worker --test worker -- --ignored throughput --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, run by hand"]
async fn throughput_of_one_worker_over_smtp() -> Result<()> {
    let n: usize = std::env::var("THROUGHPUT_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let smtp = SmtpServer::start();
    let mut env = env_with(&smtp).await?;
    env.set("WORKER_CONCURRENCY", "64");
    let capture = env.capture().await?;
    let requests: Vec<serde_json::Value> = (0..n)
        .map(|i| request(&user(), &format!("user{i}@example.com")))
        .collect();
    // Queue everything first, then start the worker: this measures the worker.
    for chunk in requests.chunks(200) {
        for r in futures_util::future::join_all(chunk.iter().map(|r| env.publish(r))).await {
            r?;
        }
    }
    if std::env::var("THROUGHPUT_ASYNC_COMMIT").is_ok() {
        // How much of the time is commit latency (fsync)?
        let pool = env.pool().await?;
        let sql = format!(
            "ALTER DATABASE \"{}\" SET synchronous_commit = off",
            env.db_name
        );
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await?;
        pool.close().await;
    }
    let started = Instant::now();
    let worker = env.start_worker().await?;
    let events = capture.wait_for(n, Duration::from_secs(300)).await;
    let took = started.elapsed();
    eprintln!(
        "{} outcomes in {took:?}: {:.0}/s",
        events.len(),
        events.len() as f64 / took.as_secs_f64()
    );
    if std::env::var("THROUGHPUT_METRICS").is_ok() {
        let (_, metrics) = worker.get("/metrics").await?;
        for line in metrics
            .lines()
            .filter(|l| l.contains("_sum") || l.contains("_count"))
        {
            eprintln!("{line}");
        }
    }
    assert_eq!(events.len(), n);
    assert_eq!(smtp.count(), n);
    worker.stop().await?;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_token_format_itsdangerous_the_link_is_an_itsdangerous_token_of_the_email()
-> Result<()> {
    let smtp = SmtpServer::start();
    let mut env = env_with(&smtp).await?;
    env.set("TOKEN_FORMAT", "itsdangerous");
    let capture = env.capture().await?;
    let worker = env.start_worker().await?;

    let req = request(&user(), "legacy@example.com");
    env.publish(&req).await?;
    let o = capture
        .outcome_of(req["id"].as_str().context("id")?, WAIT)
        .await?;
    assert_eq!(o["type"], "verimail.verification.sent");
    let mails = smtp.wait_for_mails(1, WAIT).await;
    let link = mails
        .first()
        .and_then(|m| m.link.clone())
        .context("a link")?;
    let token = link
        .rsplit('/')
        .next()
        .context("a token at the end of the link")?;
    let keys = Keys::new(
        SECRET.to_owned().into(),
        Vec::new(),
        "email-confirm".to_owned(),
    );
    let signer = Signer::new(&keys, verimail_shared::token::Digest::Sha1);
    let legacy = signer.verify_itsdangerous(token, 3600, OffsetDateTime::now_utc())?;
    assert_eq!(legacy.email.as_deref(), Some("legacy@example.com"));

    worker.stop().await?;
    env.cleanup().await;
    Ok(())
}
