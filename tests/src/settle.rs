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

use std::future::Future;
use std::time::Duration;

use crate::env::TestEnv;
use crate::tap::EventTap;

/// Waits until `env`'s deployment on the machine's broker has settled (see
/// the module docs), seen twice in a row; false after `timeout`.
pub async fn settled(env: &TestEnv, tap: &EventTap, timeout: Duration) -> bool {
    settled_by(env, tap.queue_name(), timeout, || {
        list_queues("rabbitmqctl", &[])
    })
    .await
}

/// [`settled`] for any broker: `list` returns `rabbitmqctl list_queues -q
/// --no-table-headers name messages_ready messages_unacknowledged` as run
/// against it (`None` when it could not), e.g. a cluster node's.
pub async fn settled_by<F, Fut>(
    env: &TestEnv,
    tap_queue: &str,
    timeout: Duration,
    mut list: F,
) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut quiet_rounds = 0;
    let mut last = (false, None);
    while tokio::time::Instant::now() < deadline {
        let outbox = outbox_empty(env).await;
        let listing = list().await;
        let quiet = outbox
            && listing
                .as_deref()
                .is_some_and(|listing| queues_quiet(listing, env, tap_queue));
        if quiet {
            quiet_rounds += 1;
            if quiet_rounds == 2 {
                return true;
            }
        } else {
            quiet_rounds = 0;
        }
        last = (outbox, listing);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // What was still moving, so a failure says which of the two it was.
    let (outbox, listing) = last;
    eprintln!(
        "not settled after {timeout:?}: outbox empty: {outbox}; the last queue listing \
         (name, ready, unacknowledged; the tap is {tap_queue}):\n{}",
        listing.as_deref().unwrap_or("(no node answered)")
    );
    false
}

/// The arguments after `rabbitmqctl` (or a wrapper such as
/// `rabbitmq-cluster.sh ctl 1`) that list every queue's counts.
pub const LIST_QUEUES: &[&str] = &[
    "list_queues",
    "-q",
    "--no-table-headers",
    "name",
    "messages_ready",
    "messages_unacknowledged",
];

/// Runs `program` with `prefix` then [`LIST_QUEUES`]; its stdout, or `None`.
pub async fn list_queues(program: &str, prefix: &[&str]) -> Option<String> {
    let out = tokio::process::Command::new(program)
        .args(prefix)
        .args(LIST_QUEUES)
        .output()
        .await
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The gateway's outbox has no row left (a database without the table, as
/// before the first migration, has none either).
pub async fn outbox_empty(env: &TestEnv) -> bool {
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

/// In a `list_queues` listing, every queue of the namespace and the tap's
/// holds no message, ready or unacknowledged, and the tap's queue is there.
pub fn queues_quiet(listing: &str, env: &TestEnv, tap_queue: &str) -> bool {
    let prefix = format!("{}.", env.namespace);
    let dead = verimail_shared::bus::Topology::new(&env.namespace).dead_queue();
    let mut saw_tap = false;
    for line in listing.lines() {
        let mut fields = line.split_whitespace();
        let (Some(name), Some(ready), Some(unacked)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let is_tap = name == tap_queue;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_is_quiet_only_with_empty_queues_and_the_tap_present() {
        let env = TestEnv::new("settle");
        let ns = &env.namespace;
        let quiet = format!("{ns}.worker\t0\t0\n{ns}.dead\t3\t0\ntap\t0\t0\nother.worker\t9\t9\n");
        assert!(queues_quiet(&quiet, &env, "tap"));
        let held = format!("{ns}.worker\t0\t1\ntap\t0\t0\n");
        assert!(!queues_quiet(&held, &env, "tap"));
        let queued = format!("{ns}.retry.5s\t2\t0\ntap\t0\t0\n");
        assert!(!queues_quiet(&queued, &env, "tap"));
        let unread = format!("{ns}.worker\t0\t0\ntap\t1\t0\n");
        assert!(!queues_quiet(&unread, &env, "tap"));
        let no_tap = format!("{ns}.worker\t0\t0\n");
        assert!(!queues_quiet(&no_tap, &env, "tap"));
    }
}
