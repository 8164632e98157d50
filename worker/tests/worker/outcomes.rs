//! Each request ends in exactly one outcome: `sent` with its mail,
//! `throttled` within the window, `failed` naming the field, a dead letter
//! for a body that is no event; a duplicate id never mails twice, even with
//! three workers racing.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use lapin::types::{FieldTable, ShortString};
use serde_json::{Value, json};
use verimail_shared::bus::{HEADER_DETAIL, HEADER_REASON, header_str};

use crate::support::{TestEnv, request, user};
use crate::{WAIT, data_str};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_request_is_mailed_and_answered_sent() -> Result<()> {
    let env = TestEnv::new().await?;
    let capture = env.capture().await?;
    let worker = env.start_worker().await?;

    let req = request(&user(), "alice@example.com");
    let id = req["id"].as_str().context("id")?.to_owned();
    env.publish(&req).await?;

    let outcome = capture.outcome_of(&id, WAIT).await?;
    assert_eq!(outcome["type"], "verimail.verification.sent", "{outcome}");
    assert_eq!(outcome["source"], "/verimail/worker");
    assert_eq!(outcome["traceparent"], req["traceparent"]);
    assert!(outcome["time"].is_string());
    assert!(!data_str(&outcome, "sent_at").is_empty());
    assert!(!data_str(&outcome, "expires_at").is_empty());
    assert_eq!(outcome["data"]["email"], "alice@example.com");
    assert_eq!(outcome["data"]["context"], json!({"signup_flow": "b"}));
    let mails = env.wait_for_outbox(1, WAIT).await;
    assert_eq!(mails.len(), 1);
    assert!(
        mails[0].contains("https://verify.example.com/confirm/"),
        "the mail carries the link"
    );

    let pool = env.pool().await?;
    let (email, sent): (Option<String>, bool) =
        sqlx::query_as("SELECT email, sent_at IS NOT NULL FROM requests WHERE id = $1")
            .bind(&id)
            .fetch_one(&pool)
            .await?;
    assert_eq!(email.as_deref(), Some("alice@example.com"));
    assert!(sent, "sent_at is recorded for the gateway");
    pool.close().await;

    worker.stop().await?;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_request_within_the_window_is_throttled() -> Result<()> {
    let env = TestEnv::new().await?;
    let capture = env.capture().await?;
    let worker = env.start_worker().await?;

    let uid = user();
    let first = request(&uid, "bob@example.com");
    env.publish(&first).await?;
    let first_outcome = capture
        .outcome_of(first["id"].as_str().context("id")?, WAIT)
        .await?;
    assert_eq!(first_outcome["type"], "verimail.verification.sent");

    let second = request(&uid, "bob@example.com");
    env.publish(&second).await?;
    let outcome = capture
        .outcome_of(second["id"].as_str().context("id")?, WAIT)
        .await?;
    assert_eq!(
        outcome["type"], "verimail.verification.throttled",
        "{outcome}"
    );
    let retry_after = outcome["data"]["retry_after_seconds"]
        .as_u64()
        .context("integer")?;
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_eq!(env.outbox_mails().len(), 1);

    worker.stop().await?;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_request_fails_naming_the_field_and_a_foreign_return_url_has_its_reason()
-> Result<()> {
    let env = TestEnv::new().await?;
    let capture = env.capture().await?;
    let worker = env.start_worker().await?;

    let mut bad_email = request(&user(), "not-an-address");
    bad_email["data"]["email"] = json!("not-an-address");
    env.publish(&bad_email).await?;
    let mut foreign = request(&user(), "carol@example.com");
    foreign["data"]["return_url"] = json!("https://evil.example.net/x");
    env.publish(&foreign).await?;

    let o = capture
        .outcome_of(bad_email["id"].as_str().context("id")?, WAIT)
        .await?;
    assert_eq!(o["type"], "verimail.verification.failed");
    assert_eq!(o["data"]["reason"], "invalid_request");
    assert!(data_str(&o, "detail").starts_with("email:"), "{o}");
    assert_eq!(o["data"]["email"], Value::Null);
    assert_eq!(o["data"]["user_id"], bad_email["data"]["user_id"]);

    let o = capture
        .outcome_of(foreign["id"].as_str().context("id")?, WAIT)
        .await?;
    assert_eq!(o["data"]["reason"], "return_url_not_allowed", "{o}");
    assert!(data_str(&o, "detail").starts_with("return_url"));

    // A duplicate of the invalid request gets no second outcome.
    env.publish(&bad_email).await?;
    let marker = request(&user(), "marker@example.com");
    env.publish(&marker).await?;
    capture
        .outcome_of(marker["id"].as_str().context("id")?, WAIT)
        .await?;
    assert_eq!(
        capture
            .outcomes_of(bad_email["id"].as_str().context("id")?)
            .len(),
        1
    );
    assert_eq!(
        env.wait_for_outbox(1, WAIT).await.len(),
        1,
        "only the marker was mailed"
    );

    worker.stop().await?;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_message_is_dead_lettered_and_the_worker_goes_on() -> Result<()> {
    let env = TestEnv::new().await?;
    let capture = env.capture().await?;
    let worker = env.start_worker().await?;

    env.publish_raw("junk-1", b"this is not json", FieldTable::default())
        .await?;
    let next = request(&user(), "dave@example.com");
    env.publish(&next).await?;

    let o = capture
        .outcome_of(next["id"].as_str().context("id")?, WAIT)
        .await?;
    assert_eq!(o["type"], "verimail.verification.sent");
    let dead = env.wait_for_dead(1, WAIT).await?;
    ensure!(dead.len() == 1, "one dead letter, got {}", dead.len());
    let letter = &dead[0];
    assert_eq!(letter.data, b"this is not json");
    let headers = letter.properties.headers().as_ref();
    assert_eq!(
        header_str(headers, HEADER_REASON).as_deref(),
        Some("undecodable")
    );
    assert!(header_str(headers, HEADER_DETAIL).is_some_and(|d| d.contains("not JSON")));
    assert_eq!(
        letter
            .properties
            .message_id()
            .as_ref()
            .map(ShortString::as_str),
        Some("junk-1")
    );
    assert_eq!(
        capture.events().len(),
        1,
        "no outcome for the undecodable body"
    );

    worker.stop().await?;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_event_id_yields_one_mail_and_one_outcome() -> Result<()> {
    let env = TestEnv::new().await?;
    let capture = env.capture().await?;
    let worker = env.start_worker().await?;

    let req = request(&user(), "erin@example.com");
    let id = req["id"].as_str().context("id")?.to_owned();
    // Concurrent copies, then a late one.
    for _ in 0..5 {
        env.publish(&req).await?;
    }
    capture.outcome_of(&id, WAIT).await?;
    env.publish(&req).await?;
    // Copies that found the request in hand wait 5 s in a retry queue; once
    // they are back in the worker queue, a marker published now comes after them.
    env.wait_for_retries_drained(WAIT).await?;
    let marker = request(&user(), "marker@example.com");
    env.publish(&marker).await?;
    capture
        .outcome_of(marker["id"].as_str().context("id")?, WAIT)
        .await?;
    assert_eq!(
        capture.outcomes_of(&id).len(),
        1,
        "{:?}",
        capture.outcomes_of(&id)
    );
    assert_eq!(
        env.outbox_mails().len(),
        2,
        "one mail for the request, one for the marker"
    );

    let pool = env.pool().await?;
    let remaining: i64 = sqlx::query_scalar("SELECT count(*) FROM requests WHERE state <> 'done'")
        .fetch_one(&pool)
        .await?;
    assert_eq!(remaining, 0);
    // The mark follows the ack: both requests' outcomes are recorded as
    // published (so a later duplicate is a no-op at once), soon after.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let unmarked: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM requests r WHERE NOT EXISTS (
                 SELECT 1 FROM published p WHERE p.request_id = r.id
                   AND p.outcome_id = convert_from(r.outcome, 'UTF8')::jsonb ->> 'id')",
        )
        .fetch_one(&pool)
        .await?;
        if unmarked == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{unmarked} requests never marked published"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pool.close().await;

    worker.stop().await?;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_and_a_hundred_simultaneous_requests_for_one_user_send_exactly_one_mail()
-> Result<()> {
    let mut env = TestEnv::new().await?;
    env.set("WORKER_CONCURRENCY", "32");
    let capture = env.capture().await?;
    let workers = [
        env.start_worker().await?,
        env.start_worker().await?,
        env.start_worker().await?,
    ];
    let uid = user();
    let requests: Vec<Value> = (0..100)
        .map(|i| request(&uid, &format!("user{i}@example.com")))
        .collect();
    let publishes = requests.iter().map(|r| env.publish(r));
    for r in futures_util::future::join_all(publishes).await {
        r?;
    }
    let events = capture.wait_for(100, Duration::from_secs(60)).await;
    assert_eq!(events.len(), 100);
    let sent = events
        .iter()
        .filter(|e| e["type"] == "verimail.verification.sent")
        .count();
    let throttled = events
        .iter()
        .filter(|e| e["type"] == "verimail.verification.throttled")
        .count();
    assert_eq!((sent, throttled), (1, 99));
    assert_eq!(env.outbox_mails().len(), 1);

    for w in workers {
        w.stop().await?;
    }
    env.cleanup().await;
    Ok(())
}
