//! Transient delivery failures: a retry queue with the attempt counted,
//! `delivery_failed` and a replayable dead letter past the retry window, and
//! replays that never reopen a request that was sent.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use verimail_shared::bus::{HEADER_REASON, header_str};
use verimail_worker::retry::HEADER_FAILED_OUTCOME;

use crate::WAIT;
use crate::support::{TestEnv, request, user};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_past_the_window_fail_with_delivery_failed_and_a_replayable_dead_letter()
-> Result<()> {
    let mut env = TestEnv::new().await?;
    // Nothing listens on port 1: connection refused is transient.
    env.set("MAIL_URL", "smtp+plain://127.0.0.1:1")
        .set("MAIL_RETRY_WINDOW_SECONDS", "0");
    let capture = env.capture().await?;
    let worker = env.start_worker().await?;

    let req = request(&user(), "frank@example.com");
    let id = req["id"].as_str().context("id")?.to_owned();
    env.publish(&req).await?;
    let o = capture.outcome_of(&id, WAIT).await?;
    assert_eq!(o["type"], "verimail.verification.failed");
    assert_eq!(o["data"]["reason"], "delivery_failed", "{o}");
    let dead = env.wait_for_dead(1, WAIT).await?;
    ensure!(dead.len() == 1, "one dead letter");
    let letter = &dead[0];
    let headers = letter.properties.headers().clone();
    assert_eq!(
        header_str(headers.as_ref(), HEADER_REASON).as_deref(),
        Some("delivery_failed")
    );
    assert_eq!(
        header_str(headers.as_ref(), HEADER_FAILED_OUTCOME).as_deref(),
        o["id"].as_str()
    );
    assert_eq!(letter.data, req.to_string().into_bytes());
    worker.stop().await?;

    // The operator fixes MAIL_URL and replays the letter (what `verimail dead
    // replay` does: same body and id, headers carried, to the exchange).
    env.set("MAIL_URL", format!("file://{}", env.outbox.display()));
    let worker = env.start_worker().await?;
    let mut replay_headers = FieldTable::default();
    if let Some(h) = headers.as_ref() {
        for (k, v) in h.inner() {
            if k.as_str() == HEADER_FAILED_OUTCOME {
                replay_headers.insert(k.clone(), v.clone());
            }
        }
    }
    env.publish_raw(&id, &letter.data, replay_headers.clone())
        .await?;
    let deadline = std::time::Instant::now() + WAIT;
    while capture.outcomes_of(&id).len() < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let outcomes = capture.outcomes_of(&id);
    assert_eq!(outcomes.len(), 2, "{outcomes:?}");
    assert_eq!(outcomes[1]["type"], "verimail.verification.sent");
    assert_eq!(env.wait_for_outbox(1, WAIT).await.len(), 1);

    // The same replay delivered again is a plain duplicate.
    env.publish_raw(&id, &letter.data, replay_headers).await?;
    let marker = request(&user(), "marker@example.com");
    env.publish(&marker).await?;
    capture
        .outcome_of(marker["id"].as_str().context("id")?, WAIT)
        .await?;
    assert_eq!(capture.outcomes_of(&id).len(), 2);
    assert_eq!(env.outbox_mails().len(), 2);

    worker.stop().await?;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_failure_goes_to_a_retry_queue_with_its_count() -> Result<()> {
    let mut env = TestEnv::new().await?;
    env.set("MAIL_URL", "smtp+plain://127.0.0.1:1")
        .set("MAIL_RETRY_WINDOW_SECONDS", "900");
    let capture = env.capture().await?;
    let worker = env.start_worker().await?;

    let req = request(&user(), "gina@example.com");
    let id = req["id"].as_str().context("id")?.to_owned();
    env.publish(&req).await?;
    let pool = env.pool().await?;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let attempts: Option<i32> = sqlx::query_scalar(
            "SELECT attempts FROM requests WHERE id = $1 AND lease_until IS NULL",
        )
        .bind(&id)
        .fetch_optional(&pool)
        .await?;
        if attempts.is_some_and(|a| a >= 1) {
            break;
        }
        ensure!(std::time::Instant::now() < deadline, "no retry recorded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let state: String = sqlx::query_scalar("SELECT state FROM requests WHERE id = $1")
        .bind(&id)
        .fetch_one(&pool)
        .await?;
    assert_eq!(state, "processing");
    assert!(
        capture.outcomes_of(&id).is_empty(),
        "no outcome while retrying"
    );
    pool.close().await;

    worker.stop().await?;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_marking_an_unknown_failed_outcome_does_not_reopen_a_sent_request() -> Result<()> {
    let env = TestEnv::new().await?;
    let capture = env.capture().await?;
    let worker = env.start_worker().await?;
    let req = request(&user(), "ivy@example.com");
    let id = req["id"].as_str().context("id")?.to_owned();
    env.publish(&req).await?;
    capture.outcome_of(&id, WAIT).await?;
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from(HEADER_FAILED_OUTCOME),
        AMQPValue::LongString("not-the-stored-one".into()),
    );
    env.publish_raw(&id, req.to_string().as_bytes(), headers)
        .await?;
    let marker = request(&user(), "marker@example.com");
    env.publish(&marker).await?;
    capture
        .outcome_of(marker["id"].as_str().context("id")?, WAIT)
        .await?;
    assert_eq!(capture.outcomes_of(&id).len(), 1);
    assert_eq!(env.outbox_mails().len(), 2);
    worker.stop().await?;
    env.cleanup().await;
    Ok(())
}
