//! The worker against real RabbitMQ and PostgreSQL, in-process, each test in
//! its own namespace and database.

mod hardening;
mod smtp_flows;
mod store_sql;
mod support;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde_json::{Value, json};
use verimail_shared::bus::{HEADER_DETAIL, HEADER_REASON, header_str};
use verimail_worker::retry::HEADER_FAILED_OUTCOME;

use support::{TestEnv, request, user};

const WAIT: Duration = Duration::from_secs(20);

fn data_str<'a>(event: &'a Value, field: &str) -> &'a str {
    event["data"][field].as_str().unwrap_or_default()
}

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
    // The mark follows the ack: both requests are recorded as published (so a
    // later duplicate is a no-op at once) and their leases released, soon after.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let unmarked: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM requests WHERE NOT outcome_published OR lease_until IS NOT NULL",
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
async fn readyz_and_metrics_answer_and_shutdown_returns_promptly() -> Result<()> {
    let env = TestEnv::new().await?;
    let capture = env.capture().await?;
    let worker = env.start_worker().await?;

    let (status, _) = worker.get("/healthz").await?;
    assert_eq!(status, 200);
    let (status, _) = worker.get("/readyz").await?;
    assert_eq!(status, 200);

    let req = request(&user(), "hank@example.com");
    env.publish(&req).await?;
    capture
        .outcome_of(req["id"].as_str().context("id")?, WAIT)
        .await?;
    let (status, body) = worker.get("/metrics").await?;
    assert_eq!(status, 200);
    assert!(body.contains("verimail_worker_outcomes_total"), "{body}");
    // The attempts counter of a sent mail (a handle registered at start).
    assert!(
        body.lines()
            .any(|l| l.starts_with("verimail_worker_smtp_attempts_total{")
                && l.contains(r#"result="sent""#)
                && l.ends_with(" 1")),
        "{body}"
    );
    assert!(
        body.contains("verimail_worker_processing_seconds"),
        "{body}"
    );

    let started = std::time::Instant::now();
    let addr = worker.addr;
    worker.stop().await?;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(
        support::http_get(addr, "/healthz").await.is_err(),
        "the ops server is gone"
    );
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_while_the_database_is_unreachable() -> Result<()> {
    let env = TestEnv::new().await?;
    let worker = env.start_worker().await?;
    let deadline = std::time::Instant::now() + WAIT;
    while worker.get("/readyz").await?.0 != 200 {
        ensure!(std::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Terminate the worker's database sessions and forbid new ones.
    let admin = sqlx::PgPool::connect(&format!("{}/postgres", support::PG)).await?;
    let db = env.db_name.clone();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE \"{db}\" WITH ALLOW_CONNECTIONS false"
    )))
    .execute(&admin)
    .await?;
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&db)
        .execute(&admin)
        .await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(6);
    let mut saw_503 = false;
    while std::time::Instant::now() < deadline {
        if worker.get("/readyz").await?.0 == 503 {
            saw_503 = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE \"{db}\" WITH ALLOW_CONNECTIONS true"
    )))
    .execute(&admin)
    .await?;
    admin.close().await;
    assert!(saw_503, "readyz noticed the outage within 6 s");
    let deadline = std::time::Instant::now() + WAIT;
    while worker.get("/readyz").await?.0 != 200 {
        ensure!(std::time::Instant::now() < deadline, "not ready again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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

/// Closes every broker connection whose name contains `needle` (rabbitmqctl).
async fn close_connections(needle: &str) -> Result<usize> {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .output()
        .await?;
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut closed = 0;
    for line in listing.lines().filter(|l| l.contains(needle)) {
        let Some(pid) = line.split_whitespace().next() else {
            continue;
        };
        let status = tokio::process::Command::new("rabbitmqctl")
            .args(["-q", "close_connection", pid, "test closes it"])
            .status()
            .await?;
        if status.success() {
            closed += 1;
        } else {
            eprintln!("rabbitmqctl close_connection {pid} failed: {status}");
        }
    }
    Ok(closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_reconnects_after_losing_the_broker_connection() -> Result<()> {
    let env = TestEnv::new().await?;
    let capture = env.capture().await?;
    let worker = env.start_worker().await?;
    let first = request(&user(), "one@example.com");
    env.publish(&first).await?;
    capture
        .outcome_of(first["id"].as_str().context("id")?, WAIT)
        .await?;

    let closed = close_connections(&format!("verimail-worker {}", env.ns)).await?;
    ensure!(closed >= 1, "found no connection of the worker to close");
    let second = request(&user(), "two@example.com");
    env.publish(&second).await?;
    let o = capture
        .outcome_of(
            second["id"].as_str().context("id")?,
            Duration::from_secs(30),
        )
        .await?;
    assert_eq!(o["type"], "verimail.verification.sent");
    assert_eq!(env.outbox_mails().len(), 2);
    let deadline = std::time::Instant::now() + WAIT;
    while worker.get("/readyz").await?.0 != 200 {
        ensure!(std::time::Instant::now() < deadline, "not ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    worker.stop().await?;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_arriving_during_a_database_outage_is_served_once_it_is_back() -> Result<()> {
    let env = TestEnv::new().await?;
    let capture = env.capture().await?;
    let worker = env.start_worker().await?;
    let admin = sqlx::PgPool::connect(&format!("{}/postgres", support::PG)).await?;
    let db = env.db_name.clone();
    let set_allowed = |allowed: bool| {
        sqlx::AssertSqlSafe(format!(
            "ALTER DATABASE \"{db}\" WITH ALLOW_CONNECTIONS {allowed}"
        ))
    };
    sqlx::query(set_allowed(false)).execute(&admin).await?;
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&db)
        .execute(&admin)
        .await?;

    let req = request(&user(), "patient@example.com");
    let id = req["id"].as_str().context("id")?.to_owned();
    env.publish(&req).await?;
    let deadline = std::time::Instant::now() + WAIT;
    while worker.get("/readyz").await?.0 != 503 {
        ensure!(std::time::Instant::now() < deadline, "never unready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(capture.outcomes_of(&id).is_empty());
    sqlx::query(set_allowed(true)).execute(&admin).await?;
    admin.close().await;

    let o = capture.outcome_of(&id, Duration::from_secs(40)).await?;
    assert_eq!(o["type"], "verimail.verification.sent");
    assert_eq!(env.outbox_mails().len(), 1);
    worker.stop().await?;
    env.cleanup().await;
    Ok(())
}
