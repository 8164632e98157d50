//! Keeps the tables small: a periodic task deletes request, throttle,
//! confirmation and webhook-receipt records older than `RETENTION_HOURS`, in
//! small batches so no statement holds locks for long or bloats one
//! transaction. The suppression list is never swept: its entries are what
//! protects the sender, and only an operator lifts one.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Rows deleted per statement: small enough to keep each lock brief.
pub const BATCH: i64 = 1000;

/// What one sweep deleted, per table.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Rows of `requests`.
    pub requests: u64,
    /// Rows of `throttle`.
    pub throttle: u64,
    /// Rows of `confirmations`.
    pub confirmations: u64,
    /// Rows of `webhook_receipts` (providers stopped retrying long before).
    pub webhook_receipts: u64,
}

/// Each table's age column. Only finished requests (`state = 'done'`) go: one
/// still being retried keeps its idempotency record however old it is.
const STATEMENTS: [(&str, &str); 4] = [
    (
        "requests",
        // A request's published marks and provider message ids go with it.
        "WITH gone AS (SELECT id FROM requests \
         WHERE created_at < now() - make_interval(secs => $1) AND state = 'done' \
         LIMIT $2 FOR UPDATE SKIP LOCKED), \
         marks AS (DELETE FROM published p USING gone WHERE p.request_id = gone.id), \
         messages AS (DELETE FROM provider_messages m USING gone WHERE m.request_id = gone.id) \
         DELETE FROM requests WHERE id IN (SELECT id FROM gone)",
    ),
    (
        "throttle",
        "DELETE FROM throttle WHERE (user_id, purpose) IN (SELECT user_id, purpose FROM throttle \
         WHERE last_sent_at < now() - make_interval(secs => $1) LIMIT $2 FOR UPDATE SKIP LOCKED)",
    ),
    (
        "confirmations",
        "DELETE FROM confirmations WHERE key IN (SELECT key FROM confirmations \
         WHERE verified_at < now() - make_interval(secs => $1) LIMIT $2 FOR UPDATE SKIP LOCKED)",
    ),
    (
        "webhook_receipts",
        "DELETE FROM webhook_receipts WHERE (provider, event_key) IN (SELECT provider, event_key \
         FROM webhook_receipts WHERE received_at < now() - make_interval(secs => $1) \
         LIMIT $2 FOR UPDATE SKIP LOCKED)",
    ),
];

/// Deletes everything older than `retention`, batch by batch, pausing between
/// batches so the hot path keeps the database.
pub async fn sweep(pool: &PgPool, retention: Duration) -> Result<Swept, sqlx::Error> {
    let secs = retention.as_secs_f64();
    let mut swept = Swept::default();
    for (table, sql) in STATEMENTS {
        loop {
            let deleted = sqlx::query(sql)
                .bind(secs)
                .bind(BATCH)
                .execute(pool)
                .await?
                .rows_affected();
            match table {
                "requests" => swept.requests += deleted,
                "throttle" => swept.throttle += deleted,
                "webhook_receipts" => swept.webhook_receipts += deleted,
                _ => swept.confirmations += deleted,
            }
            if deleted < BATCH as u64 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(swept)
}

/// Sweeps every `every` until `shutdown`; errors are logged and retried at
/// the next tick (a database outage must not stop the service).
pub async fn run(pool: PgPool, retention: Duration, every: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        match sweep(&pool, retention).await {
            Ok(s) if s != Swept::default() => tracing::info!(
                requests = s.requests,
                throttle = s.throttle,
                confirmations = s.confirmations,
                webhook_receipts = s.webhook_receipts,
                "retention: deleted old records"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "retention sweep failed; will retry"),
        }
    }
}
