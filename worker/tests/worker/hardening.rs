//! The worker when PostgreSQL is slow, stuck or gone: deadlines, failover,
//! readiness, no second mail, no spent delivery limit.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use verimail_tests::smtp::SmtpServer;

use crate::support::{Proxy, RunningWorker, TestEnv, request, user};

const WAIT: Duration = Duration::from_secs(30);

/// Polls `/readyz` until it answers `status`.
async fn readyz_becomes(worker: &RunningWorker, status: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let (got, body) = worker.get("/readyz").await?;
        if got == status {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "/readyz still {got}, not {status}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A claim stuck behind a lock an operator's session holds: the batch gives
/// up (lock timeout), `/readyz` turns 503 while batches run out of time,
/// other deliveries still complete, and the stuck one completes once the
/// lock goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_stuck_on_a_lock_fails_over_and_readyz_says_so() -> Result<()> {
    let env = TestEnv::new().await?;
    let capture = env.capture().await?;
    let worker = env.start_worker().await?;
    let pool = env.pool().await?;

    // A first request gives the user a throttle row.
    let stuck_user = user();
    let first = request(&stuck_user, "first@example.com");
    env.publish(&first).await?;
    capture
        .outcome_of(first["id"].as_str().context("id")?, WAIT)
        .await?;
    readyz_becomes(&worker, 200, WAIT).await?;

    let mut hold = pool.begin().await?;
    sqlx::query("SELECT 1 FROM throttle WHERE user_id = $1 FOR UPDATE")
        .bind(&stuck_user)
        .execute(&mut *hold)
        .await?;
    let stuck = request(&stuck_user, "second@example.com");
    let stuck_id = stuck["id"].as_str().context("id")?.to_owned();
    env.publish(&stuck).await?;
    readyz_becomes(&worker, 503, WAIT).await?;

    // Another user's request still gets through while the lock is held.
    let other = request(&user(), "other@example.com");
    env.publish(&other).await?;
    let o = capture
        .outcome_of(other["id"].as_str().context("id")?, WAIT)
        .await?;
    assert_eq!(o["type"], "verimail.verification.sent", "{o}");
    assert!(
        capture.outcomes_of(&stuck_id).is_empty(),
        "the stuck claim waits for the lock"
    );

    hold.rollback().await?;
    let o = capture.outcome_of(&stuck_id, WAIT).await?;
    assert!(
        o["type"] == "verimail.verification.throttled" || o["type"] == "verimail.verification.sent",
        "{o}"
    );
    // A batch completes again (the next delivery's), and readiness is back.
    let after = request(&user(), "after@example.com");
    env.publish(&after).await?;
    capture
        .outcome_of(after["id"].as_str().context("id")?, WAIT)
        .await?;
    readyz_becomes(&worker, 200, WAIT).await?;

    pool.close().await;
    worker.stop().await?;
    env.cleanup().await;
    Ok(())
}

/// The sum of counter `name` with `label` in `/metrics`.
async fn counter(worker: &RunningWorker, name: &str, label: &str) -> Result<f64> {
    let (_, text) = worker.get("/metrics").await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// SMTP accepted the mail, then the worker lost PostgreSQL for longer than
/// its lease while a copy of the request arrived: when the database is back,
/// the live worker stores and publishes its outcome, and the copy neither
/// claims the row nor sends again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_worker_cut_from_the_database_past_its_lease_never_mails_twice() -> Result<()> {
    let smtp = SmtpServer::start();
    let proxy = Proxy::start("127.0.0.1:5432").await?;
    let mut env = TestEnv::new().await?;
    env.set("MAIL_URL", smtp.mail_url());
    let url = format!("postgres://postgres@{}/{}", proxy.addr, env.db_name);
    env.set("DATABASE_URL", url);
    let capture = env.capture().await?;
    let lease = Duration::from_secs(2);
    let worker = env.start_worker_with_lease(lease).await?;

    // The send hangs until the database is cut, then goes through.
    smtp.set_hang(true);
    let req = request(&user(), "once@example.com");
    let id = req["id"].as_str().context("id")?.to_owned();
    env.publish(&req).await?;
    let deadline = Instant::now() + WAIT;
    while smtp.stats().connections == 0 {
        ensure!(Instant::now() < deadline, "the worker never began the send");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    proxy.cut();
    smtp.set_hang(false);
    assert_eq!(smtp.wait_for_mails(1, WAIT).await.len(), 1);

    // A copy arrives while the database is gone; the outage outlasts the lease.
    let before = counter(&worker, "verimail_worker_duplicates_total", "done").await?;
    env.publish(&req).await?;
    tokio::time::sleep(lease * 4).await;
    proxy.resume();

    let o = capture.outcome_of(&id, WAIT).await?;
    assert_eq!(o["type"], "verimail.verification.sent", "{o}");
    // The copy ends as a duplicate of the finished request.
    let deadline = Instant::now() + Duration::from_secs(60);
    while counter(&worker, "verimail_worker_duplicates_total", "done").await? <= before {
        ensure!(Instant::now() < deadline, "the copy was never settled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.wait_for_retries_drained(WAIT).await?;
    assert_eq!(smtp.count(), 1, "one mail");
    assert_eq!(capture.outcomes_of(&id).len(), 1, "one outcome");

    worker.stop().await?;
    env.cleanup().await;
    Ok(())
}

/// A database outage longer than the old in-place budget: the delivery holds
/// its message and retries in place instead of handing it back, so the
/// outage spends none of the queue's delivery limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_database_outage_spends_no_deliveries() -> Result<()> {
    use lapin::options::BasicGetOptions;
    let proxy = Proxy::start("127.0.0.1:5432").await?;
    let mut env = TestEnv::new().await?;
    let url = format!("postgres://postgres@{}/{}", proxy.addr, env.db_name);
    env.set("DATABASE_URL", url);
    let worker = env.start_worker().await?;
    proxy.cut();
    let req = request(&user(), "patient@example.com");
    let id = req["id"].as_str().context("id")?.to_owned();
    let before = counter(&worker, "verimail_worker_database_errors_total", "").await?;
    env.publish(&req).await?;
    // The claim fails and is retried in place; the outage lasts past the
    // 20 s after which the delivery used to be handed back.
    let deadline = Instant::now() + WAIT;
    while counter(&worker, "verimail_worker_database_errors_total", "").await? <= before {
        ensure!(Instant::now() < deadline, "the claim never failed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(27)).await;
    // Stopping hands the held message back once; a worker that had handed it
    // back on every failed round would have spent more deliveries.
    worker.stop().await?;
    proxy.resume();
    let channel = env.channel().await?;
    let deadline = Instant::now() + WAIT;
    let msg = loop {
        let got = channel
            .basic_get(
                env.topology.worker_queue().as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await?;
        if let Some(msg) = got {
            break msg;
        }
        ensure!(Instant::now() < deadline, "the request left the queue");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        msg.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str()),
        Some(id.as_str())
    );
    let count = msg
        .delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-delivery-count").cloned());
    let count = match count {
        Some(lapin::types::AMQPValue::LongLongInt(n)) => n,
        Some(lapin::types::AMQPValue::LongInt(n)) => i64::from(n),
        Some(lapin::types::AMQPValue::LongUInt(n)) => i64::from(n),
        Some(other) => anyhow::bail!("x-delivery-count {other:?}"),
        None => 0,
    };
    assert!(count <= 1, "deliveries spent: {count}");
    env.cleanup().await;
    Ok(())
}

/// A request left `processing` with its retry window spent (its message
/// dead-lettered by the broker, say) is replayable: the replayed copy gets a
/// fresh attempt and a fresh window instead of failing at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_letter_of_a_processing_request_gets_a_fresh_window() -> Result<()> {
    use lapin::types::{AMQPValue, FieldTable};
    let smtp = SmtpServer::start();
    smtp.set_mode(verimail_tests::smtp::Mode::TempFail);
    let mut env = TestEnv::new().await?;
    env.set("MAIL_URL", smtp.mail_url());
    let capture = env.capture().await?;
    let worker = env.start_worker().await?;
    let pool = env.pool().await?;
    let uid = user();
    let req = request(&uid, "stuck@example.com");
    let id = req["id"].as_str().context("id")?.to_owned();
    sqlx::query(
        "INSERT INTO requests (id, user_id, email, purpose, state, throttle_passed, attempts,
                               first_attempt_at)
         VALUES ($1, $2, 'stuck@example.com', 'verify_email', 'processing', true, 7,
                 now() - interval '3 days')",
    )
    .bind(&id)
    .bind(&uid)
    .execute(&pool)
    .await?;
    let mut headers = FieldTable::default();
    headers.insert("x-verimail-replayed".into(), AMQPValue::Boolean(true));
    env.publish_raw(&id, &serde_json::to_vec(&req)?, headers)
        .await?;
    // Parked for a retry as a first attempt, not failed.
    let deadline = Instant::now() + WAIT;
    loop {
        let parked: Option<bool> = sqlx::query_scalar(
            "SELECT state = 'processing' AND attempts = 1 AND lease_until IS NULL
                    AND first_attempt_at > now() - interval '1 minute'
             FROM requests WHERE id = $1",
        )
        .bind(&id)
        .fetch_optional(&pool)
        .await?;
        if parked == Some(true) {
            break;
        }
        ensure!(
            capture.outcomes_of(&id).is_empty(),
            "an outcome instead of a retry: {:?}",
            capture.outcomes_of(&id)
        );
        ensure!(Instant::now() < deadline, "the replay was never retried");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(capture.outcomes_of(&id).is_empty());
    pool.close().await;
    worker.stop().await?;
    env.cleanup().await;
    Ok(())
}
