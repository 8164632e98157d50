//! Every SQL statement the worker runs, against the `requests` and `throttle`
//! tables (see `shared/migrations/20261126000001_core.sql`).
//!
//! A request row moves `processing` → `done` once. While `processing`, a worker
//! holds it through `lease_until`; a redelivery may take it over only once the
//! lease has run out (the previous holder crashed). The common path costs three
//! statements: [`Store::claim`] (claim and throttle in one round trip),
//! [`Store::finish`] (outcome stored with `state = 'done'`) and
//! [`Store::mark_published`]. Under load, [`BatchedStore`] runs the claims of
//! concurrent deliveries as one statement ([`Store::claim_batch`]), and their
//! conclusions together with the marks of outcomes published meanwhile as
//! another ([`Store::finish_batch`]), both in one transaction (a round): one
//! commit for many deliveries.
//!
//! # One lock order, one SQL text per step
//!
//! Every statement locks its rows in one order, so two workers' statements
//! never wait on each other in a cycle: the existing `requests` rows in id
//! order, then the `throttle` rows in (`user_id`, `purpose`) order, then the
//! new `requests` rows in id order. Each statement forces it with
//! `ORDER BY ... FOR UPDATE` and the order its CTEs are read in (the comments
//! at the statements say how). A round holds its conclusions' locks while
//! its claims take theirs: the one cycle that allows (two workers each
//! claiming a duplicate of what the other concludes, at once) PostgreSQL
//! breaks, and the rounds' callers run alone (see `session::round`). The single-request methods ([`Store::claim`],
//! [`Store::finish`], [`Store::mark_published`]) run the batch statement with
//! one row, so the fallback of a failed batch cannot drift from it.
//!
//! # Batches run on connections of their own
//!
//! The batching task keeps its connections outside the pool (one per
//! running round, [`crate::batch::IN_FLIGHT`]), opened with
//! planner settings that rule out sequential scans, hash and merge joins
//! ([`BATCH_SESSION`]). Its statements are prepared once and their plans
//! cached, as the single-request ones are; but PostgreSQL switches a cached
//! statement to a generic plan after five runs, chosen with the table sizes of
//! that moment, and a worker starting on a fresh or small `requests` table
//! would keep a plan that scans the whole table for every batch, each batch
//! slower as the table grows (docs/performance.md has the measurement). Every
//! batch statement reaches its rows by primary key, so on these connections
//! the only plans left are the right ones at any size, and the generic plan
//! is always kept (`plan_cache_mode`): PostgreSQL would otherwise re-plan
//! whenever a custom plan looks cheaper, as one that folds the parameters in
//! does. Planning each batch (unnamed statements, or re-planning) cost more
//! than running it.

//! # Rooms
//!
//! This file: the row types and the single-request statements. [`batch`]: the
//! batch statements and their inputs. [`session`]: [`BatchedStore`], which
//! batches concurrent deliveries into rounds, and the batching task's own
//! connection.

use std::time::Duration;

use serde_json::{Map, Value};
use sqlx::{PgPool, Row};
use time::OffsetDateTime;
use verimail_shared::suppression::SuppressionReason;

mod batch;
mod session;

pub use batch::{ClaimInput, FinishInput, LookBack, Mark, Write};
pub use session::{BATCH_SESSION, BatchedStore, LOCK_TIMEOUT, STATEMENT_TIMEOUT, deadlines};

use batch::claimed_from;

/// The fields of a request stored on its row (the gateway reads `return_url`,
/// `context`, `email` and `sent_at` from there).
#[derive(Debug, Clone, Copy)]
pub struct RequestRow<'a> {
    /// The CloudEvent id (idempotency key).
    pub id: &'a str,
    /// `data.user_id`, when valid.
    pub user_id: Option<&'a str>,
    /// `data.email`, when valid.
    pub email: Option<&'a str>,
    /// `data.purpose`, when valid.
    pub purpose: Option<&'a str>,
    /// `data.locale`, as requested.
    pub locale: Option<&'a str>,
    /// `data.return_url`.
    pub return_url: Option<&'a str>,
    /// `data.context`.
    pub context: Option<&'a Map<String, Value>>,
}

/// What claiming a request found.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// This worker now holds the request.
    Claimed(Claimed),
    /// The request already has an outcome.
    Done(Stored),
    /// Another delivery holds a live lease on it (a concurrent duplicate).
    Busy,
}

/// A request this worker holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Claimed {
    /// The address is on the suppression list (read by the claim itself):
    /// no mail, no connection, no throttle slot.
    pub suppressed: Option<SuppressionReason>,
    /// The throttle let this request through (now or on an earlier attempt).
    pub throttle_passed: bool,
    /// Delivery attempts before this one.
    pub attempts: i32,
    /// Seconds since the first attempt, by the database's clock.
    pub elapsed: Duration,
}

/// The outcome stored on a `done` row.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// The outcome's CloudEvent type.
    pub outcome_type: Option<String>,
    /// The outcome event, as published.
    pub outcome: Option<Vec<u8>>,
    /// Whether the broker confirmed it.
    pub published: bool,
}

/// How a `done` row is written.
#[derive(Debug, Clone, Copy)]
pub struct Finish<'a> {
    /// The request id.
    pub id: &'a str,
    /// The outcome's CloudEvent type.
    pub outcome_type: &'a str,
    /// The outcome event's bytes.
    pub outcome: &'a [u8],
    /// When the SMTP server accepted the mail (`sent` only); also refreshes the throttle.
    pub sent_at: Option<OffsetDateTime>,
    /// The keyed hash of the code in the mail (`sent` with a code only); its
    /// wrong tries start again at zero.
    pub code_hash: Option<&'a [u8]>,
    /// The HTTP API's own id of the mail (`sent` through an API only).
    pub provider_message_id: Option<&'a str>,
    /// Whether this delivery made a send attempt (counts in `attempts`).
    pub attempted: bool,
    /// No mail went out: give the throttle back if this request holds it.
    pub release_throttle: bool,
    /// The recipient was refused for good and `SUPPRESS_ON_REJECT` is on:
    /// the address goes on the suppression list (reason
    /// `recipient_rejected`, this detail) in the same statement.
    pub suppress: Option<&'a str>,
}

/// Access to the worker's tables.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    lease: Duration,
}

impl Store {
    /// A store on `pool` whose claims last `lease`.
    pub fn new(pool: PgPool, lease: Duration) -> Self {
        Self { pool, lease }
    }

    /// The pool (readiness checks).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Claims `row` and, when `throttle` is given (interval between two mails
    /// to one user for one purpose), takes the throttle for it in the same
    /// statement.
    ///
    /// The throttle is only attempted when the row does not exist yet or is a
    /// `processing` row whose lease ran out and that has not passed yet: so a
    /// duplicate of an old request never extends a user's throttle window.
    /// Two concurrent duplicates may both take the throttle, harmlessly: it is
    /// held by the same request id, which the upsert lets through.
    pub async fn claim(
        &self,
        row: RequestRow<'_>,
        throttle: Option<Duration>,
    ) -> Result<Claim, sqlx::Error> {
        self.claim_with(row, throttle, true).await
    }

    /// [`Store::claim`]; `takeover` says whether an expired lease may be
    /// taken over (not while just back from an outage: see `process`).
    pub async fn claim_with(
        &self,
        row: RequestRow<'_>,
        throttle: Option<Duration>,
        takeover: bool,
    ) -> Result<Claim, sqlx::Error> {
        // The batch statement with one row: the two can never drift apart.
        let mut conn = self.pool.acquire().await?;
        let input = ClaimInput::new(row, throttle).takeover(takeover);
        let claimed = self.claim_batch_on(&mut conn, &[input]).await?;
        if let Some(Some(claimed)) = claimed.first() {
            return Ok(Claim::Claimed(*claimed));
        }
        self.lookup_and_lease(row.id).await
    }

    /// What a request that could not be claimed holds. A `done` row whose
    /// outcome was never confirmed is handed to this caller to re-publish
    /// (taking the lease, so concurrent duplicates do not all publish it), but
    /// only once the delivery that concluded it is gone: while it still holds
    /// the lease it is publishing right now, and the caller gets `Busy`.
    pub async fn lookup_and_lease(&self, id: &str) -> Result<Claim, sqlx::Error> {
        let row = sqlx::query(
            r"
WITH marked AS (
    SELECT r.id, r.state, r.outcome_type, r.outcome,
           r.outcome_published OR EXISTS (
               SELECT 1 FROM published p
               WHERE p.request_id = r.id
                 AND p.outcome_id = convert_from(r.outcome, 'UTF8')::jsonb ->> 'id'
           ) AS published
    FROM requests r WHERE r.id = $1
),
took AS (
    UPDATE requests r SET lease_until = now() + $2::float8 * interval '1 second'
    FROM marked m
    WHERE r.id = m.id AND r.state = 'done' AND NOT m.published
      AND (r.lease_until IS NULL OR r.lease_until < now())
    RETURNING r.id
)
SELECT state, outcome_type, outcome, published AS outcome_published,
       EXISTS (SELECT 1 FROM took) AS took
FROM marked",
        )
        .bind(id)
        .bind(self.lease.as_secs_f64())
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            // Deleted by retention between the two statements: try again later.
            return Ok(Claim::Busy);
        };
        let state: String = row.try_get("state")?;
        let published: bool = row.try_get("outcome_published")?;
        let took: bool = row.try_get("took")?;
        if state != "done" || !(published || took) {
            return Ok(Claim::Busy);
        }
        Ok(Claim::Done(Stored {
            outcome_type: row.try_get("outcome_type")?,
            outcome: row.try_get("outcome")?,
            published,
        }))
    }

    /// How long until the throttle of `(user_id, purpose)` lets a mail through
    /// again (`None` when nothing holds it any more).
    pub async fn throttle_remaining(
        &self,
        user_id: &str,
        purpose: &str,
        throttle: Duration,
    ) -> Result<Option<f64>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT EXTRACT(EPOCH FROM (last_sent_at + $3::float8 * interval '1 second' - now()))::float8
             FROM throttle WHERE user_id = $1 AND purpose = $2",
        )
        .bind(user_id)
        .bind(purpose)
        .bind(throttle.as_secs_f64())
        .fetch_optional(&self.pool)
        .await
    }

    /// Stores the outcome and marks the request `done`, refreshing (sent) or
    /// releasing (no mail) the throttle it holds, in one statement. The
    /// refresh is skipped when the mail went out within a second of the claim
    /// that took the throttle (the common case): it would move the window by
    /// less than a second and costs a row version and two index entries per
    /// mail, about a third of this statement's work. The lease
    /// is renewed and runs out on its own (the mark writes a row of its own
    /// and leaves this one alone): a duplicate arriving before
    /// [`Store::mark_published`] waits instead of publishing the outcome too,
    /// one arriving after it finds the mark. Returns
    /// `false` when the row was no longer `processing` (another delivery
    /// finished it after our lease ran out).
    pub async fn finish(&self, f: Finish<'_>) -> Result<bool, sqlx::Error> {
        // The batch statement with one row: the two can never drift apart.
        let mut conn = self.pool.acquire().await?;
        let done = self
            .finish_batch_on(
                &mut conn,
                &[Write::Finish(FinishInput::new(&f))],
                LookBack::Yes,
            )
            .await?;
        Ok(done.first().copied().unwrap_or(false))
    }

    /// Records that the broker confirmed the stored outcome (the batch
    /// statement with one mark).
    pub async fn mark_published(&self, mark: &Mark) -> Result<(), sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        self.finish_batch_on(
            &mut conn,
            &[Write::MarkPublished(mark.clone())],
            LookBack::No,
        )
        .await?;
        Ok(())
    }

    /// Gives the request back after a transient failure (its copy waits in a
    /// retry queue): the lease ends, the attempt is counted, the row stays
    /// `processing`.
    pub async fn release_for_retry(&self, id: &str) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE requests SET lease_until = NULL, attempts = attempts + 1
             WHERE id = $1 AND state = 'processing'",
        )
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Restarts the retry window of a `processing` request this delivery
    /// holds (a replayed letter): attempts back to 0, first attempt now.
    pub async fn restart_window(&self, id: &str) -> Result<Option<Claimed>, sqlx::Error> {
        let row = sqlx::query(
            r"
UPDATE requests SET attempts = 0, first_attempt_at = now()
WHERE id = $1 AND state = 'processing'
RETURNING throttle_passed, attempts,
          EXTRACT(EPOCH FROM (now() - first_attempt_at))::float8 AS elapsed,
          (SELECT s.reason FROM suppressions s WHERE lower(s.email) = lower(requests.email)) AS suppressed",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(claimed_from).transpose()
    }

    /// Reopens a request that ended `failed`/`delivery_failed` with outcome
    /// `outcome_id`, for a replay of its dead letter: a fresh attempt with a
    /// fresh retry window. `None` when the row is not in that state (any other
    /// delivery of the replay is then a plain duplicate).
    pub async fn reopen(&self, id: &str, outcome_id: &str) -> Result<Option<Claimed>, sqlx::Error> {
        let row = sqlx::query(
            r"
UPDATE requests
SET state = 'processing', lease_until = now() + $3::float8 * interval '1 second',
    attempts = 0, first_attempt_at = now(), outcome_type = NULL, outcome = NULL,
    outcome_published = false, sent_at = NULL
WHERE id = $1 AND state = 'done' AND outcome_type = $4
  AND convert_from(outcome, 'UTF8')::jsonb ->> 'id' = $2
RETURNING throttle_passed, attempts,
          EXTRACT(EPOCH FROM (now() - first_attempt_at))::float8 AS elapsed,
          (SELECT s.reason FROM suppressions s WHERE lower(s.email) = lower(requests.email)) AS suppressed",
        )
        .bind(id)
        .bind(outcome_id)
        .bind(self.lease.as_secs_f64())
        .bind(verimail_shared::events::VERIFICATION_FAILED)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(claimed_from).transpose()
    }
}
