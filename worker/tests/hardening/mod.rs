//! The worker when PostgreSQL is slow, stuck or gone: deadlines, failover,
//! readiness, no second mail, no spent delivery limit.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use crate::support::{RunningWorker, TestEnv, request, user};

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
