//! The outbox relay: publishes the verified events that confirmations wrote to
//! `outbox`, each with the broker's confirm, and deletes a row only then.
//!
//! Invariants:
//! - a click never waits for the broker: it only writes to PostgreSQL, and the
//!   relay catches up when the broker is back, with the same event id;
//! - rows are taken `FOR UPDATE SKIP LOCKED` inside a short transaction, so
//!   several gateways never publish one row at the same time (a crash between
//!   the confirm and the delete re-publishes it: at least once, same id).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;

use sqlx::PgPool;
use time::OffsetDateTime;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use verimail_shared::bus::{Bus, BusError, Outgoing, Publisher, Topology};

use crate::metrics::Metrics;
use crate::{BusSlot, store};

/// Rows taken per transaction.
pub const BATCH: i64 = 500;
/// Poll period when nothing wakes the relay (another gateway's rows, retries).
pub const POLL: Duration = Duration::from_secs(1);
/// After a wake-up, how long the relay lets events accumulate before a pass:
/// an event leaves this much later, and a busy outbox is emptied in a few
/// large transactions instead of many small ones.
pub const COALESCE: Duration = Duration::from_millis(10);
/// Wait after a failure before trying again.
pub const BACKOFF: Duration = Duration::from_secs(2);
/// How often events older than `RETENTION_HOURS` are looked for (and once at start).
pub const EXPIRE_EVERY: Duration = Duration::from_secs(60);
/// Wait after the broker returned events for want of a bound queue.
pub const UNROUTABLE_BACKOFF: Duration = Duration::from_secs(10);
/// Longest a batch may take to publish before it is handed back.
pub const BATCH_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the relay waits for a broker connection before leaving the rows
/// alone (no transaction is opened without a connection).
const CONNECT_WAIT: Duration = Duration::from_secs(2);

/// The relay's dependencies.
#[derive(Debug, Clone)]
pub struct Relay {
    /// Where the outbox lives.
    pub pool: PgPool,
    /// The broker connection, once made.
    pub bus: BusSlot,
    /// Names of the exchange.
    pub topology: Topology,
    /// Wakes the relay after a confirmation.
    pub wake: Arc<Notify>,
    /// Backlog gauge and publish counters.
    pub metrics: Metrics,
    /// Poll period when nothing wakes the relay ([`POLL`]; tests lengthen it
    /// to prove that a click wakes the relay).
    pub poll: Duration,
    /// `RETENTION_HOURS`: an event still unpublished after it is dropped.
    /// Its confirmation record is deleted by then too; and an event nobody
    /// subscribed to would otherwise stay (and be re-read) for ever.
    pub retention: Duration,
}

/// What one batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatchOutcome {
    /// Rows the broker confirmed (and that were deleted).
    pub published: usize,
    /// Rows whose publish failed (left in place), unroutable ones included.
    pub failed: usize,
    /// Rows the broker returned because no queue is bound (left in place).
    pub unroutable: usize,
}

/// Why a batch could not run.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The database failed.
    #[error("outbox database: {0}")]
    Database(#[from] sqlx::Error),
    /// The broker is not connected (yet).
    #[error("broker not connected")]
    NoBroker,
    /// Publishing the batch took too long.
    #[error("publishing timed out")]
    Timeout,
}

impl Relay {
    /// Runs until `shutdown`, then makes one last short attempt to empty the outbox.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut publisher: Option<(Arc<Bus>, Publisher)> = None;
        let mut last_gauge: Option<Instant> = None;
        let mut last_expiry: Option<Instant> = None;
        let mut need_declare = false;
        loop {
            let pass = self.pass(&mut publisher, &mut need_declare);
            let pause = tokio::select! {
                pause = pass => pause,
                () = shutdown.cancelled() => break,
            };
            if last_expiry.is_none_or(|t| t.elapsed() >= EXPIRE_EVERY) {
                last_expiry = Some(Instant::now());
                self.expire().await;
            }
            if last_gauge.is_none_or(|t| t.elapsed() >= POLL) {
                last_gauge = Some(Instant::now());
                match store::outbox_backlog(&self.pool).await {
                    Ok(rows) => self.metrics.backlog(rows),
                    Err(e) => tracing::debug!(error = %e, "outbox backlog unknown"),
                }
                self.metrics.upkeep();
            }
            let woken = tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.wake.notified(), if pause == self.poll => true,
                () = tokio::time::sleep(pause) => false,
            };
            if woken {
                // Let the clicks of the next moments join this pass: under
                // load one transaction (and one commit) then carries many
                // events instead of one batch of clicks each.
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(COALESCE) => {}
                }
            }
        }
        // Hand over what was confirmed in the last moments, if the broker is there.
        if let Some((_, publisher)) = &publisher {
            let last = tokio::time::timeout(Duration::from_secs(3), self.batch(publisher)).await;
            if let Ok(Ok(outcome)) = last
                && outcome.published > 0
            {
                tracing::info!(published = outcome.published, "outbox flushed at shutdown");
            }
            // Before the gateway closes the connection (see `Publisher::close`).
            publisher.close().await;
        }
    }

    /// Drops events older than the retention, with a warning and a count.
    async fn expire(&self) {
        match store::expire_outbox(&self.pool, self.retention).await {
            Ok(0) => {}
            Ok(n) => {
                self.metrics.expired(n);
                tracing::warn!(
                    events = n,
                    retention_hours = self.retention.as_secs() / 3600,
                    "verified events older than RETENTION_HOURS were never confirmed by the broker (is a queue bound to verimail.email.verified?); dropped from the outbox"
                );
            }
            Err(e) => tracing::warn!(error = %e, "expiring old outbox events failed; will retry"),
        }
    }

    /// Publishes batches until the outbox is empty or something fails; returns
    /// how long to wait before the next pass.
    async fn pass(
        &self,
        publisher: &mut Option<(Arc<Bus>, Publisher)>,
        need_declare: &mut bool,
    ) -> Duration {
        let Some(bus) = self.bus.get() else {
            return self.poll;
        };
        let publisher = match publisher {
            Some((current, p)) if Arc::ptr_eq(current, &bus) => &*p,
            slot => &slot.insert((bus.clone(), Publisher::new(bus))).1,
        };
        loop {
            if *need_declare {
                // A failed publish may mean the broker lost its definitions
                // (a fresh node): declare again before retrying.
                match tokio::time::timeout(
                    BATCH_TIMEOUT,
                    redeclare(publisher.bus(), &self.topology),
                )
                .await
                {
                    Ok(Ok(())) => *need_declare = false,
                    _ => return BACKOFF,
                }
            }
            match self.batch(publisher).await {
                Ok(outcome) if outcome.failed > outcome.unroutable => {
                    *need_declare = true;
                    return BACKOFF;
                }
                // Waiting for a subscriber to bind: no need to hurry.
                Ok(outcome) if outcome.unroutable > 0 => return UNROUTABLE_BACKOFF,
                Ok(outcome) if outcome.published as i64 == BATCH => continue,
                Ok(_) => return self.poll,
                Err(RelayError::NoBroker) => return BACKOFF,
                Err(e) => {
                    tracing::warn!(error = %e, "outbox relay failed, retrying");
                    return BACKOFF;
                }
            }
        }
    }

    /// In one short transaction: takes (deletes) up to [`BATCH`] rows,
    /// publishes them concurrently, and puts back those the broker did not
    /// confirm, so a row leaves the outbox only once confirmed.
    pub async fn batch(&self, publisher: &Publisher) -> Result<BatchOutcome, RelayError> {
        // Never hold row locks while waiting for a reconnection.
        match tokio::time::timeout(CONNECT_WAIT, publisher.bus().connection()).await {
            Ok(Ok(conn)) if conn.status().connected() => {}
            _ => return Err(RelayError::NoBroker),
        }
        let mut tx = self.pool.begin().await?;
        // Taken and deleted in one statement (the rows stay locked, and come
        // back if the transaction rolls back): a separate `FOR UPDATE` would
        // write a lock into every row first, then the delete again.
        let rows: Vec<(String, String, Vec<u8>, OffsetDateTime)> = sqlx::query_as(
            "DELETE FROM outbox WHERE id IN ( \
                 SELECT id FROM outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) \
             RETURNING id, routing_key, body, created_at",
        )
        .bind(BATCH)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(BatchOutcome::default());
        }
        let publishes = rows.iter().map(|row| async move {
            let (id, routing_key, body, _) = row;
            let msg = Outgoing::event(&self.topology, routing_key, id, body);
            (row, publisher.publish(&msg).await)
        });
        let results = match tokio::time::timeout(BATCH_TIMEOUT, join_all(publishes)).await {
            Ok(results) => results,
            Err(_) => {
                // Dropping the transaction rolls back: the rows stay, unlocked.
                self.metrics.publish_failed(rows.len() as u64);
                return Err(RelayError::Timeout);
            }
        };
        let mut confirmed = 0;
        let mut kept = Vec::new();
        let mut unroutable = 0;
        let mut first_error = None;
        for (row, result) in results {
            match result {
                Ok(()) => confirmed += 1,
                Err(BusError::Unroutable(_)) => {
                    unroutable += 1;
                    kept.push(row);
                }
                Err(e) => {
                    first_error.get_or_insert((&row.0, e));
                    kept.push(row);
                }
            }
        }
        let failed = kept.len();
        if unroutable > 0 {
            // Nobody bound a queue to `verimail.email.verified`: the events wait
            // in the outbox for a subscriber instead of being dropped.
            tracing::warn!(
                events = unroutable,
                "verified events are unroutable (no queue bound to verimail.email.verified); kept in the outbox"
            );
        }
        if let Some((id, e)) = first_error {
            tracing::warn!(event_id = %id, error = %e, failed, "publishing verified events failed; kept in the outbox");
        }
        if !kept.is_empty() {
            // What the broker did not confirm goes back, as it was, in the
            // same transaction: it leaves the outbox only once confirmed.
            sqlx::query(
                "INSERT INTO outbox (id, routing_key, body, created_at) \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::timestamptz[])",
            )
            .bind(kept.iter().map(|r| r.0.as_str()).collect::<Vec<_>>())
            .bind(kept.iter().map(|r| r.1.as_str()).collect::<Vec<_>>())
            .bind(kept.iter().map(|r| r.2.as_slice()).collect::<Vec<_>>())
            .bind(kept.iter().map(|r| r.3).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        self.metrics.published(confirmed as u64);
        self.metrics.publish_failed(failed as u64);
        Ok(BatchOutcome {
            published: confirmed,
            failed,
            unroutable,
        })
    }
}

/// Declares the exchange the gateway publishes to (at start, and again when
/// the relay finds it gone).
pub(crate) async fn redeclare(bus: &Bus, topology: &Topology) -> Result<(), BusError> {
    bus.set_up("declaring the exchange", async |channel| {
        verimail_shared::bus::declare_exchange(channel, topology).await?;
        Ok(())
    })
    .await
}
