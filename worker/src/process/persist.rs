//! Database steps that must not be abandoned: each retries in place, with
//! backoff, for as long as PostgreSQL is away, holding its message (a nack
//! would count towards the queue's delivery limit), until the shutdown
//! deadline.

use std::future::Future;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use tracing::{debug, warn};

use super::{Ctx, Failure};
use crate::metrics;
use crate::store::{Claim, RequestRow};

/// Longest one database step may take, ours: a batched call (at most 8 s)
/// and then its statement alone (a 5 s statement timeout, a 3 s wait for a
/// connection), with room to spare.
const STEP_DEADLINE: Duration = Duration::from_secs(20);
/// Longest pause between two database attempts.
const MAX_DB_BACKOFF: Duration = Duration::from_secs(5);
/// How long after its own last database failure a worker leaves expired
/// leases alone: every worker saw the outage (the readiness probe asks each
/// second), and a live holder stores its outcome within one backoff
/// ([`MAX_DB_BACKOFF`]) of the database's return, well inside this.
pub const TAKEOVER_GRACE: Duration = Duration::from_secs(20);

/// Backoff between two attempts of a database step: exponential from 125 ms,
/// with jitter that at most doubles each wait, so never above
/// [`MAX_DB_BACKOFF`]; no limit on the number of attempts (the shutdown
/// deadline ends them).
fn db_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_jitter()
        .with_min_delay(MAX_DB_BACKOFF / 40)
        .with_max_delay(MAX_DB_BACKOFF / 2)
        .without_max_times()
}

/// Claims, retrying in place (backoff up to 5 s) for as long as the database
/// is down, holding the message: a nack would count towards the queue's
/// delivery limit, and a long outage would dead-letter requests.
pub(super) async fn claim(
    ctx: &Ctx,
    row: RequestRow<'_>,
    interval: Option<Duration>,
) -> Result<Claim, Failure> {
    let t = Instant::now();
    let claim = claim_with_budget(ctx, || {
        // Just back from an outage, a lease that ran out during it may be a
        // live worker's that could not store its outcome yet: not taken over
        // before the grace has passed (ARCHITECTURE.md, crash window 1).
        let takeover = ctx.health.since_db_failure() >= TAKEOVER_GRACE;
        ctx.batches.claim(row, interval, takeover)
    })
    .await;
    metrics::step("claim", t.elapsed());
    claim
}

pub(super) async fn claim_with_budget<T, F, Fut>(ctx: &Ctx, mut op: F) -> Result<T, Failure>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    let attempts = (|| bounded(Box::pin(op())))
        .retry(db_backoff())
        .notify(|e, wait| {
            metrics::db_error();
            ctx.health.set_db(false);
            debug!(error = %e, retry_in = ?wait, "claim failed; retrying");
        });
    tokio::select! {
        v = attempts => {
            // Only errors are retried, without end: the first Ok ends it.
            let v = v.map_err(|_| Failure::Stopped)?;
            ctx.health.set_db(true);
            Ok(v)
        }
        () = ctx.hard_stop.cancelled() => Err(Failure::Stopped),
    }
}

/// One database step under a deadline of our own: the server's statement
/// timeout cannot end a statement whose socket stopped answering (a
/// half-open connection), so past [`STEP_DEADLINE`] the step is dropped, its
/// connection with it, and retried like any failure.
///
/// Callers box the step: a statement's future (a batched call with its
/// fallback, sqlx's machinery) is kilobytes, and unboxed it was copied whole
/// into the retry loop, its timeout and each enclosing future on every move
/// (callgrind: `memcpy` was half of the worker's instructions).
async fn bounded<T>(step: impl Future<Output = Result<T, sqlx::Error>>) -> Result<T, sqlx::Error> {
    tokio::time::timeout(STEP_DEADLINE, step)
        .await
        .unwrap_or_else(|_| {
            Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer from PostgreSQL in time",
            )))
        })
}

/// Runs a database step that must not be abandoned (a decision was made, a
/// mail may be out) until it succeeds or the shutdown deadline passes.
pub(super) async fn persist<T, F, Fut>(
    ctx: &Ctx,
    what: &'static str,
    mut op: F,
) -> Result<T, Failure>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    let attempts = (|| bounded(Box::pin(op())))
        .retry(db_backoff())
        .notify(|e, wait| {
            ctx.health.set_db(false);
            warn!(error = %e, what, retry_in = ?wait, "database failed; retrying");
        });
    tokio::select! {
        v = attempts => v.map_err(|_| Failure::Stopped),
        () = ctx.hard_stop.cancelled() => Err(Failure::Stopped),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_backoff_grows_and_stays_bounded() {
        let waits: Vec<Duration> = backon::BackoffBuilder::build(db_backoff())
            .take(40)
            .collect();
        assert_eq!(waits.len(), 40, "no limit on attempts");
        assert!(waits[0] >= Duration::from_millis(125) && waits[0] <= Duration::from_millis(250));
        assert!(waits.iter().all(|w| *w <= MAX_DB_BACKOFF));
        assert!(waits[10] >= MAX_DB_BACKOFF / 2);
    }
}
