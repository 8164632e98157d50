//! Running the worker: `/healthz`, `/readyz` and `/metrics`, a prompt stop,
//! and what a lost broker connection or a database outage does (readiness
//! follows, requests wait and are served once it is back).

use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::WAIT;
use crate::support::{self, TestEnv, request, user};

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
