//! Pauses of delivery targets, shared by every worker of the namespace.
//!
//! A target that asks us to slow down (`Retry-After`, SMTP 421/454) is
//! paused here at once, and its row in `mail_target_pauses` (keyed by
//! namespace and target, never a secret) tells the other workers, which read
//! the live pauses every [`POLL`]: no statement per mail. While a target is
//! paused a mail goes to the next target of a failover list, or waits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tracing::{debug, warn};

/// How often a worker reads the namespace's pauses.
pub const POLL: Duration = Duration::from_millis(200);
/// Longest a pause's write may take before the worker goes on without it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// The paused targets this worker knows of.
#[derive(Debug, Default)]
pub struct Pauses {
    local: Mutex<HashMap<String, Instant>>,
    shared: Mutex<Option<(PgPool, String)>>,
}

impl Pauses {
    /// How much longer `target` is paused, if it is.
    pub fn left(&self, target: &str) -> Option<Duration> {
        let until = *self.lock().get(target)?;
        let left = until.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// Pauses `target` for `length`, here and for every worker of the namespace.
    pub async fn pause(&self, target: &str, length: Duration) {
        self.extend(target, Instant::now() + length);
        warn!(
            target,
            pause_ms = length.as_millis(),
            "delivery target asked us to wait; paused"
        );
        metrics::counter!(PAUSES, "target" => target.to_owned()).increment(1);
        let shared = self
            .shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some((pool, namespace)) = shared else {
            return;
        };
        let write = sqlx::query(
            "INSERT INTO mail_target_pauses (namespace, target, paused_until)
             VALUES ($1, $2, clock_timestamp() + $3::float8 * interval '1 second')
             ON CONFLICT (namespace, target) DO UPDATE
             SET paused_until = GREATEST(mail_target_pauses.paused_until, EXCLUDED.paused_until)",
        )
        .bind(&namespace)
        .bind(target)
        .bind(length.as_secs_f64())
        .execute(&pool);
        match tokio::time::timeout(WRITE_TIMEOUT, write).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(error = %e, target, "the pause could not be shared"),
            Err(_) => warn!(target, "the pause could not be shared in time"),
        }
    }

    /// Shares pauses through the namespace's rows from now on, and reads the
    /// other workers' every [`POLL`] for as long as `self` lives.
    pub fn share(self: &Arc<Self>, pool: PgPool, namespace: String) {
        *self.shared.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((pool.clone(), namespace.clone()));
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(pauses) = weak.upgrade() else {
                    return;
                };
                let rows: Result<Vec<(String, f64)>, _> = sqlx::query_as(
                    "SELECT target, EXTRACT(EPOCH FROM (paused_until - clock_timestamp()))::float8
                     FROM mail_target_pauses
                     WHERE namespace = $1 AND paused_until > clock_timestamp()",
                )
                .bind(&namespace)
                .fetch_all(&pool)
                .await;
                match rows {
                    Ok(rows) => {
                        for (target, left) in rows {
                            if let Ok(left) = Duration::try_from_secs_f64(left.max(0.0)) {
                                pauses.extend(&target, Instant::now() + left);
                            }
                        }
                    }
                    Err(e) => debug!(error = %e, "reading the targets' pauses failed"),
                }
            }
        });
    }

    fn extend(&self, target: &str, until: Instant) {
        let mut local = self.lock();
        let entry = local.entry(target.to_owned()).or_insert(until);
        *entry = (*entry).max(until);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        // The map is never left half-updated.
        self.local.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Counter of pauses a target asked for, by `target`.
pub const PAUSES: &str = "verimail_worker_target_pauses_total";

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pause_holds_its_target_only_and_only_for_its_length() {
        let pauses = Pauses::default();
        assert_eq!(pauses.left("a"), None);
        pauses.pause("a", Duration::from_millis(200)).await;
        assert!(
            pauses
                .left("a")
                .is_some_and(|d| d <= Duration::from_millis(200))
        );
        assert_eq!(pauses.left("b"), None);
        // A shorter pause never shortens a longer one.
        pauses.pause("a", Duration::from_millis(10)).await;
        assert!(
            pauses
                .left("a")
                .is_some_and(|d| d > Duration::from_millis(100))
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(pauses.left("a"), None);
    }
}
