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
        let (got, _) = worker.get("/readyz").await?;
        if got == status {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "/readyz still {got}, not {status}"
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
