//! Positive signals that a deployment has settled, for tests that then assert
//! that something did NOT happen (no second mail, no second event). A fixed
//! sleep passes vacuously on a slow machine; these wait for the facts that
//! make "nothing more will come" true:
//!
//! - the gateway's outbox is empty: every committed event was published;
//! - the namespace's queues and the tap's queue hold no message, ready or
//!   unacknowledged: the worker acknowledges a request only after its outcome
//!   is published (with confirms), so every request was answered and every
//!   published event reached the tap. (The dead-letter queue is left out:
//!   dead letters stay there until replayed.)

use std::time::Duration;

use crate::env::TestEnv;
use crate::tap::EventTap;

/// Waits until `env`'s deployment has settled (see the module docs), seen
/// twice in a row; false after `timeout`.
pub async fn settled(env: &TestEnv, tap: &EventTap, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut quiet_rounds = 0;
    while tokio::time::Instant::now() < deadline {
        if outbox_empty(env).await && queues_empty(env, tap).await {
            quiet_rounds += 1;
            if quiet_rounds == 2 {
                return true;
            }
        } else {
            quiet_rounds = 0;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// The gateway's outbox has no row left (a database without the table, as
/// before the first migration, has none either).
async fn outbox_empty(env: &TestEnv) -> bool {
    let Some(url) = env.get("DATABASE_URL") else {
        return true;
    };
    let Ok(pool) = sqlx::PgPool::connect(url).await else {
        return false;
    };
    let rows: Result<i64, _> = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&pool)
        .await;
    pool.close().await;
    match rows {
        Ok(n) => n == 0,
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => true,
        Err(_) => false,
    }
}

/// Every queue of the namespace, and the tap's, holds no message (ready or
/// unacknowledged), as `rabbitmqctl list_queues` reports them.
async fn queues_empty(env: &TestEnv, tap: &EventTap) -> bool {
    let Ok(out) = tokio::process::Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ])
        .output()
        .await
    else {
        return false;
    };
    if !out.status.success() {
        return false;
    }
    let prefix = format!("{}.", env.namespace);
    let dead = verimail_shared::bus::Topology::new(&env.namespace).dead_queue();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut saw_tap = false;
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let (Some(name), Some(ready), Some(unacked)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let is_tap = name == tap.queue_name();
        // Dead letters stay where they are until an operator replays them.
        if !(is_tap || name.starts_with(&prefix)) || name == dead {
            continue;
        }
        saw_tap |= is_tap;
        if ready != "0" || unacked != "0" {
            return false;
        }
    }
    saw_tap
}
