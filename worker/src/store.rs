//! Every SQL statement the worker runs, against the `requests` and `throttle`
//! tables (see `shared/migrations/20261126000001_core.sql`).
//!
//! A request row moves `processing` → `done` once. While `processing`, a worker
//! holds it through `lease_until`; a redelivery may take it over only once the
//! lease has run out (the previous holder crashed). The common path costs three
//! statements: [`Store::claim`] (claim and throttle in one round trip),
//! [`Store::finish`] (outcome stored with `state = 'done'`) and
//! [`Store::mark_published`]. Under load, [`Batches`] runs the claims of
//! concurrent deliveries as one statement ([`Store::claim_batch`]), and their
//! conclusions together with the marks of outcomes published meanwhile as
//! another ([`Store::finish_batch`]): one round trip and one commit for many
//! deliveries.
//!
//! # One lock order, one SQL text per step
//!
//! Every statement locks its rows in one order, so two workers' statements
//! never wait on each other in a cycle: the existing `requests` rows in id
//! order, then the `throttle` rows in (`user_id`, `purpose`) order, then the
//! new `requests` rows in id order. Each statement forces it with
//! `ORDER BY ... FOR UPDATE` and the order its CTEs are read in (the comments
//! at the statements say how). The single-request methods ([`Store::claim`],
//! [`Store::finish`], [`Store::mark_published`]) run the batch statement with
//! one row, so the fallback of a failed batch cannot drift from it.
//!
//! # Batches run on connections of their own
//!
//! Each batching task keeps its connections outside the pool (one per
//! running batch, [`crate::batch::IN_FLIGHT`]), opened with
//! planner settings that rule out sequential scans, hash and merge joins
//! ([`BATCH_SESSION`]). Its statements are prepared once and their plans
//! cached, as the single-request ones are; but PostgreSQL switches a cached
//! statement to a generic plan after five runs, chosen with the table sizes of
//! that moment, and a worker starting on a fresh or small `requests` table
//! would keep a plan that scans the whole table for every batch, each batch
//! slower as the table grows (measured: 469 sequential scans reading 897,000
//! rows within the first 4,000 requests). Every batch statement reaches its
//! rows by primary key, so on these connections the only plans left are the
//! right ones at any size. Planning each batch instead (unnamed statements)
//! cost more than running it: about 0.7 ms against 0.45 ms for ten claims.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, PgPool, Row};
use time::OffsetDateTime;
use tracing::debug;

use crate::batch::{self, Batcher, Keyed};
use crate::health::Health;

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
    /// Whether this delivery made a send attempt (counts in `attempts`).
    pub attempted: bool,
    /// No mail went out: give the throttle back if this request holds it.
    pub release_throttle: bool,
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
        self.lookup(row.id).await
    }

    /// What a request that could not be claimed holds. A `done` row whose
    /// outcome was never confirmed is handed to this caller to re-publish
    /// (taking the lease, so concurrent duplicates do not all publish it), but
    /// only once the delivery that concluded it is gone: while it still holds
    /// the lease it is publishing right now, and the caller gets `Busy`.
    pub async fn lookup(&self, id: &str) -> Result<Claim, sqlx::Error> {
        let row = sqlx::query(
            r"
WITH took AS (
    UPDATE requests SET lease_until = now() + $2::float8 * interval '1 second'
    WHERE id = $1 AND state = 'done' AND NOT outcome_published
      AND (lease_until IS NULL OR lease_until < now())
    RETURNING id
)
SELECT state, outcome_type, outcome, outcome_published, EXISTS (SELECT 1 FROM took) AS took
FROM requests WHERE id = $1",
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
    /// stays until [`Store::mark_published`], so a duplicate arriving while
    /// the outcome is being published waits instead of publishing it too. Returns
    /// `false` when the row was no longer `processing` (another delivery
    /// finished it after our lease ran out).
    pub async fn finish(&self, f: Finish<'_>) -> Result<bool, sqlx::Error> {
        // The batch statement with one row: the two can never drift apart.
        let mut conn = self.pool.acquire().await?;
        let done = self
            .finish_batch_on(&mut conn, &[Conclusion::Finish(FinishInput::new(&f))])
            .await?;
        Ok(done.first().copied().unwrap_or(false))
    }

    /// Records that the broker confirmed the stored outcome (the batch
    /// statement with one mark).
    pub async fn mark_published(&self, id: &str) -> Result<(), sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        self.finish_batch_on(&mut conn, &[Conclusion::Mark(id.to_owned())])
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
          EXTRACT(EPOCH FROM (now() - first_attempt_at))::float8 AS elapsed",
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
          EXTRACT(EPOCH FROM (now() - first_attempt_at))::float8 AS elapsed",
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

impl Store {
    /// [`Store::claim`] for many requests in one statement (one commit).
    /// Answers in input order: `Some` when claimed, `None` when the request
    /// could not be claimed (the caller then runs [`Store::lookup`]).
    ///
    /// The inputs must not share a request id, nor a throttle key
    /// (`user_id`, `purpose`) among those with a throttle: a statement cannot
    /// touch one row twice, and the throttle must let exactly one of two
    /// requests for one user through. [`Batches`] sees to that.
    pub async fn claim_batch(
        &self,
        inputs: &[ClaimInput],
    ) -> Result<Vec<Option<Claimed>>, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        self.claim_batch_on(&mut conn, inputs).await
    }

    /// [`Store::claim_batch`] on a given connection.
    async fn claim_batch_on(
        &self,
        conn: &mut PgConnection,
        inputs: &[ClaimInput],
    ) -> Result<Vec<Option<Claimed>>, sqlx::Error> {
        // Over `unnest` arrays; a throttle of NULL is "no throttle" for that
        // row. Locks are taken in the order every statement here keeps (see
        // the lock order (module docs)): the existing `requests` rows in id order (`held`,
        // read whole by the first throttle row's `array_agg`), then the
        // `throttle` rows in key order (`thr`, run whole before the main
        // INSERT by its one-time filter), then the new `requests` rows in id
        // order.
        const CLAIM_BATCH: &str = r"
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                         $6::text[], $7::text[], $8::float8[])
        AS i(id, user_id, email, purpose, locale, return_url, context, throttle)
),
held AS (
    SELECT r.id, (r.state = 'done' OR r.throttle_passed OR r.lease_until >= now()
                  OR (r.lease_until IS NOT NULL AND r.id <> ALL ($10::text[]))) AS settled
    FROM requests r WHERE r.id = ANY($1::text[])
    ORDER BY r.id
    FOR UPDATE
),
thr AS (
    INSERT INTO throttle AS t (user_id, purpose, last_sent_at, request_id)
    SELECT i.user_id, i.purpose, now(), i.id FROM input i
    WHERE i.throttle IS NOT NULL
      AND i.id <> ALL (COALESCE((SELECT array_agg(h.id) FILTER (WHERE h.settled) FROM held h),
                                '{}'::text[]))
    ORDER BY i.user_id, i.purpose
    ON CONFLICT (user_id, purpose) DO UPDATE
        SET last_sent_at = now(), request_id = EXCLUDED.request_id
        WHERE t.last_sent_at <= now() - (SELECT i.throttle FROM input i
                                         WHERE i.id = EXCLUDED.request_id) * interval '1 second'
           OR t.request_id = EXCLUDED.request_id
    RETURNING t.request_id
)
INSERT INTO requests AS r (id, user_id, email, purpose, locale, return_url, context,
                           lease_until, first_attempt_at, throttle_passed)
SELECT i.id, i.user_id, i.email, i.purpose, i.locale, i.return_url, i.context::jsonb,
       now() + $9::float8 * interval '1 second', now(),
       i.throttle IS NULL OR i.id IN (SELECT request_id FROM thr)
FROM input i
WHERE (SELECT count(*) FROM thr) >= 0
ORDER BY i.id
ON CONFLICT (id) DO UPDATE
    SET lease_until = EXCLUDED.lease_until,
        throttle_passed = r.throttle_passed OR EXCLUDED.throttle_passed,
        first_attempt_at = COALESCE(r.first_attempt_at, EXCLUDED.first_attempt_at)
    WHERE r.state = 'processing'
      AND (r.lease_until IS NULL OR (r.lease_until < now() AND r.id = ANY ($10::text[])))
RETURNING r.id, r.throttle_passed, r.attempts,
          EXTRACT(EPOCH FROM (now() - r.first_attempt_at))::float8 AS elapsed";
        let order: Vec<&ClaimInput> = inputs.iter().collect();
        let column = |f: fn(&ClaimInput) -> Option<&str>| -> Vec<Option<&str>> {
            order.iter().map(|i| f(i)).collect()
        };
        let ids: Vec<&str> = order.iter().map(|i| i.id.as_str()).collect();
        let throttles: Vec<Option<f64>> = order
            .iter()
            .map(|i| i.throttle.map(|t| t.as_secs_f64()))
            .collect();
        let rows = sqlx::query(CLAIM_BATCH)
            .bind(ids)
            .bind(column(|i| i.user_id.as_deref()))
            .bind(column(|i| i.email.as_deref()))
            .bind(column(|i| i.purpose.as_deref()))
            .bind(column(|i| i.locale.as_deref()))
            .bind(column(|i| i.return_url.as_deref()))
            .bind(column(|i| i.context.as_deref()))
            .bind(throttles)
            .bind(self.lease.as_secs_f64())
            .bind(
                order
                    .iter()
                    .filter(|i| i.takeover)
                    .map(|i| i.id.as_str())
                    .collect::<Vec<_>>(),
            )
            .fetch_all(conn)
            .await?;
        let mut claimed = HashMap::with_capacity(rows.len());
        for r in &rows {
            let id: String = r.try_get("id")?;
            claimed.insert(id, claimed_from(r)?);
        }
        Ok(inputs.iter().map(|i| claimed.remove(&i.id)).collect())
    }

    /// [`Store::finish`] and [`Store::mark_published`] for many requests in
    /// one statement (one commit); answers in input order (a mark answers
    /// `true`). The inputs must not share a request id.
    pub async fn finish_batch(&self, inputs: &[Conclusion]) -> Result<Vec<bool>, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        self.finish_batch_on(&mut conn, inputs).await
    }

    /// [`Store::finish_batch`] on a given connection.
    async fn finish_batch_on(
        &self,
        conn: &mut PgConnection,
        inputs: &[Conclusion],
    ) -> Result<Vec<bool>, sqlx::Error> {
        // The marks of outcomes published since the previous batch ride along
        // (`marked`): under load that saves a statement, a round trip and a
        // commit per batch. A statement runs every data-modifying CTE, read
        // or not. Locks follow the lock order (module docs): every `requests` row of the
        // batch (finished or marked) in id order first (`held`, run whole by
        // the main query's one-time filter), then the `throttle` rows in key
        // order (`thr`, read by `touched` and `released`).
        const FINISH_BATCH: &str = r"
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::timestamptz[],
                         $5::int4[], $6::bool[], $9::bytea[])
        AS i(id, outcome_type, outcome, sent_at, attempted, release_throttle, code_hash)
),
held AS (
    SELECT id FROM requests WHERE id = ANY($1::text[] || $8::text[])
    ORDER BY id
    FOR UPDATE
),
r AS (
    UPDATE requests r
    SET state = 'done', lease_until = now() + $7::float8 * interval '1 second',
        outcome_type = i.outcome_type, outcome = i.outcome,
        sent_at = i.sent_at, attempts = r.attempts + i.attempted,
        code_hash = i.code_hash, code_attempts = 0
    FROM input i
    WHERE r.id = i.id AND r.state = 'processing'
    RETURNING r.id, r.user_id, r.purpose, i.sent_at, i.release_throttle
),
thr AS (
    SELECT t.user_id, t.purpose, r.sent_at, r.release_throttle
    FROM throttle t JOIN r ON t.user_id = r.user_id AND t.purpose = r.purpose
                          AND t.request_id = r.id
    ORDER BY t.user_id, t.purpose
    FOR UPDATE OF t
),
touched AS (
    UPDATE throttle t SET last_sent_at = x.sent_at
    FROM thr x
    WHERE x.sent_at IS NOT NULL
      AND t.user_id = x.user_id AND t.purpose = x.purpose
      AND t.last_sent_at < x.sent_at - interval '1 second'
    RETURNING 1
),
released AS (
    DELETE FROM throttle t USING thr x
    WHERE x.release_throttle AND t.user_id = x.user_id AND t.purpose = x.purpose
    RETURNING 1
),
marked AS (
    UPDATE requests SET outcome_published = true, lease_until = NULL
    WHERE id = ANY($8) AND state = 'done'
    RETURNING 1
),
-- Already stored with these very bytes (an outcome id is unique): a batch
-- whose caller gave up on it committed after all, and the caller's own
-- statement must hear `true` to publish it.
same AS (
    SELECT r.id FROM requests r JOIN input i ON r.id = i.id
    WHERE r.state = 'done' AND r.outcome = i.outcome
)
SELECT id FROM r WHERE (SELECT count(*) FROM held) >= 0
UNION ALL
SELECT id FROM same";
        let (mut order, mut marks) = (Vec::new(), Vec::new());
        for c in inputs {
            match c {
                Conclusion::Finish(f) => order.push(f),
                Conclusion::Mark(id) => marks.push(id.as_str()),
            }
        }
        let rows: Vec<String> = sqlx::query_scalar(FINISH_BATCH)
            .bind(order.iter().map(|i| i.id.as_str()).collect::<Vec<_>>())
            .bind(
                order
                    .iter()
                    .map(|i| i.outcome_type.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                order
                    .iter()
                    .map(|i| i.outcome.as_slice())
                    .collect::<Vec<_>>(),
            )
            .bind(order.iter().map(|i| i.sent_at).collect::<Vec<_>>())
            .bind(
                order
                    .iter()
                    .map(|i| i32::from(i.attempted))
                    .collect::<Vec<_>>(),
            )
            .bind(order.iter().map(|i| i.release_throttle).collect::<Vec<_>>())
            .bind(self.lease.as_secs_f64())
            .bind(marks)
            .bind(
                order
                    .iter()
                    .map(|i| i.code_hash.as_deref())
                    .collect::<Vec<_>>(),
            )
            .fetch_all(conn)
            .await?;
        let done: std::collections::HashSet<&str> = rows.iter().map(String::as_str).collect();
        Ok(inputs
            .iter()
            .map(|c| match c {
                Conclusion::Finish(f) => done.contains(f.id.as_str()),
                Conclusion::Mark(_) => true,
            })
            .collect())
    }
}

/// A claim queued for [`Store::claim_batch`]: a [`RequestRow`] and its
/// throttle, owned (it crosses to the batching task).
#[derive(Debug, Clone)]
pub struct ClaimInput {
    id: String,
    user_id: Option<String>,
    email: Option<String>,
    purpose: Option<String>,
    locale: Option<String>,
    return_url: Option<String>,
    /// `context` as JSON text.
    context: Option<String>,
    throttle: Option<Duration>,
    /// An expired lease may be taken over.
    takeover: bool,
}

impl ClaimInput {
    /// The owned form of `row` with its throttle interval.
    pub fn new(row: RequestRow<'_>, throttle: Option<Duration>) -> Self {
        Self {
            id: row.id.to_owned(),
            user_id: row.user_id.map(str::to_owned),
            email: row.email.map(str::to_owned),
            purpose: row.purpose.map(str::to_owned),
            locale: row.locale.map(str::to_owned),
            return_url: row.return_url.map(str::to_owned),
            // Serializing a JSON map cannot fail.
            context: row.context.and_then(|c| serde_json::to_string(c).ok()),
            throttle,
            takeover: true,
        }
    }

    /// Whether an expired lease may be taken over (by default it may).
    pub fn takeover(mut self, takeover: bool) -> Self {
        self.takeover = takeover;
        self
    }
}

impl Keyed for ClaimInput {
    fn keys(&self) -> [u64; 2] {
        let throttle = match (&self.throttle, &self.user_id, &self.purpose) {
            (Some(_), Some(user), Some(purpose)) => batch::key("throttle", &[user, purpose]),
            _ => 0,
        };
        [batch::key("id", &[&self.id]), throttle]
    }
}

/// A conclusion queued for [`Store::finish_batch`]: a [`Finish`], owned.
#[derive(Debug, Clone)]
pub struct FinishInput {
    id: String,
    outcome_type: String,
    outcome: Vec<u8>,
    sent_at: Option<OffsetDateTime>,
    code_hash: Option<Vec<u8>>,
    attempted: bool,
    release_throttle: bool,
}

impl FinishInput {
    /// The owned form of `f`.
    pub fn new(f: &Finish<'_>) -> Self {
        Self {
            id: f.id.to_owned(),
            outcome_type: f.outcome_type.to_owned(),
            outcome: f.outcome.to_vec(),
            sent_at: f.sent_at,
            code_hash: f.code_hash.map(<[u8]>::to_vec),
            attempted: f.attempted,
            release_throttle: f.release_throttle,
        }
    }
}

/// A job of the conclusions' batch: store an outcome, or record that the
/// broker confirmed one.
#[derive(Debug, Clone)]
pub enum Conclusion {
    /// [`Store::finish`].
    Finish(FinishInput),
    /// [`Store::mark_published`] of this request id.
    Mark(String),
}

impl Keyed for Conclusion {
    fn keys(&self) -> [u64; 2] {
        let id = match self {
            Conclusion::Finish(f) => &f.id,
            Conclusion::Mark(id) => id,
        };
        [batch::key("id", &[id]), 0]
    }
}

/// Claims and conclusions of concurrent deliveries, each kind batched into
/// one statement and one commit (see [`crate::batch`]). A batch that fails
/// (a deadlock with another worker, an outage) falls back to the
/// single-request statement for each of its callers, with their own retries.
#[derive(Debug, Clone)]
pub struct Batches {
    store: Store,
    claims: Batcher<ClaimInput, Option<Claimed>>,
    conclusions: Batcher<Conclusion, bool>,
}

impl Batches {
    /// Starts the batching tasks on `store`, each with a connection of its
    /// own; they end (and close it) when every clone is dropped. A batch that
    /// runs out of time is reported to `health` until one completes again.
    pub fn spawn(store: Store, health: Arc<Health>) -> Self {
        let claims = {
            let (s, sessions) = (store.clone(), Sessions::new(&store, &health));
            Batcher::spawn("claim", CALL_DEADLINE, move |inputs: Vec<ClaimInput>| {
                let (s, sessions) = (s.clone(), sessions.clone());
                async move {
                    sessions
                        .run("claim", inputs.len(), async |conn| {
                            s.claim_batch_on(conn, &inputs).await
                        })
                        .await
                }
            })
        };
        let conclusions = {
            let (s, sessions) = (store.clone(), Sessions::new(&store, &health));
            Batcher::spawn("finish", CALL_DEADLINE, move |inputs: Vec<Conclusion>| {
                let (s, sessions) = (s.clone(), sessions.clone());
                async move {
                    sessions
                        .run("finish", inputs.len(), async |conn| {
                            s.finish_batch_on(conn, &inputs).await
                        })
                        .await
                }
            })
        };
        Self {
            store,
            claims,
            conclusions,
        }
    }

    /// [`Store::claim_with`], batched with other deliveries' claims.
    pub async fn claim(
        &self,
        row: RequestRow<'_>,
        throttle: Option<Duration>,
        takeover: bool,
    ) -> Result<Claim, sqlx::Error> {
        let input = ClaimInput::new(row, throttle).takeover(takeover);
        match self.claims.call(input).await {
            Some(Some(claimed)) => Ok(Claim::Claimed(claimed)),
            Some(None) => self.store.lookup(row.id).await,
            None => self.store.claim_with(row, throttle, takeover).await,
        }
    }

    /// [`Store::finish`], batched with other deliveries' conclusions.
    pub async fn finish(&self, f: Finish<'_>) -> Result<bool, sqlx::Error> {
        let job = Conclusion::Finish(FinishInput::new(&f));
        match self.conclusions.call(job).await {
            Some(done) => Ok(done),
            None => self.store.finish(f).await,
        }
    }

    /// [`Store::mark_published`], batched with other deliveries' conclusions.
    pub async fn mark_published(&self, id: &str) -> Result<(), sqlx::Error> {
        match self.conclusions.call(Conclusion::Mark(id.to_owned())).await {
            Some(_) => Ok(()),
            None => self.store.mark_published(id).await,
        }
    }
}

/// Planner settings of the batching tasks' connections (see the module docs):
/// every batch statement reaches its rows by primary key, through nested
/// loops over the input arrays, at any table size.
pub const BATCH_SESSION: [(&str, &str); 3] = [
    ("enable_seqscan", "off"),
    ("enable_hashjoin", "off"),
    ("enable_mergejoin", "off"),
];

/// Longest a batching task waits for its connection to open.
const SESSION_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// `statement_timeout` of every worker statement (pool and batch sessions):
/// no statement of the worker rightly takes more than milliseconds.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
/// `lock_timeout` of every worker statement: a statement queued behind a lock
/// held this long (another session stuck, an operator's `LOCK TABLE`) gives
/// up, and its delivery retries.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a batch may run on its connection, on our side: past it the
/// connection is dropped (a socket that stopped answering never times out
/// on the server). A little more than [`STATEMENT_TIMEOUT`], so the server's
/// own timeout normally answers first.
const BATCH_DEADLINE: Duration = Duration::from_secs(6);
/// Longest a delivery waits for its batch's answer, queueing behind the
/// running batch included, before running its statement alone.
const CALL_DEADLINE: Duration = Duration::from_secs(8);

/// The server-side deadlines of the worker's connections.
pub fn deadlines() -> verimail_shared::db::Deadlines {
    verimail_shared::db::Deadlines {
        statement: Some(STATEMENT_TIMEOUT),
        lock: Some(LOCK_TIMEOUT),
    }
}

/// A batching task's own connections (one per running batch), opened on
/// first use and again after a failure (the batch's callers meanwhile fall
/// back to the pool).
#[derive(Clone)]
struct Sessions {
    options: Arc<PgConnectOptions>,
    idle: Arc<std::sync::Mutex<Vec<PgConnection>>>,
    health: Arc<Health>,
}

impl Sessions {
    /// Connections for one batching task, on the pool's server and database
    /// (with its statement and lock timeouts).
    fn new(store: &Store, health: &Arc<Health>) -> Self {
        let options = (*store.pool.connect_options())
            .clone()
            .options(BATCH_SESSION);
        Self {
            options: Arc::new(options),
            idle: Arc::default(),
            health: health.clone(),
        }
    }

    /// Runs `op` on an idle connection (or a new one). A connection whose
    /// batch failed may be broken or mid-transaction: it is dropped, and the
    /// next batch opens a fresh one.
    async fn run<T>(
        &self,
        statement: &'static str,
        n: usize,
        op: impl AsyncFnOnce(&mut PgConnection) -> Result<T, sqlx::Error>,
    ) -> Option<T> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        let result = match idle {
            Some(conn) => Ok(conn),
            None => tokio::time::timeout(SESSION_CONNECT_TIMEOUT, self.options.connect())
                .await
                .unwrap_or(Err(sqlx::Error::PoolTimedOut)),
        };
        let mut conn = match result {
            Ok(conn) => conn,
            Err(e) => {
                debug!(error = %e, statement, n, "cannot open a batch connection; its requests run alone");
                return None;
            }
        };
        // On our deadline the connection is dropped with the future: its
        // socket may have stopped answering.
        let result = tokio::time::timeout(BATCH_DEADLINE, op(&mut conn)).await;
        match result {
            Ok(Ok(v)) => {
                self.health.set_batches_stalled(false);
                self.idle
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(conn);
                Some(v)
            }
            Ok(Err(e)) => {
                // A statement or lock timeout: the batch was stuck, not refused.
                let timed_out = matches!(&e, sqlx::Error::Database(d)
                    if matches!(d.code().as_deref(), Some("57014") | Some("55P03")));
                if timed_out {
                    self.health.set_batches_stalled(true);
                }
                debug!(error = %e, statement, n, "batch failed; its requests run alone");
                None
            }
            Err(_) => {
                self.health.set_batches_stalled(true);
                debug!(
                    statement,
                    n, "batch ran out of time; its requests run alone"
                );
                None
            }
        }
    }
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions").finish_non_exhaustive()
    }
}

fn claimed_from(r: &sqlx::postgres::PgRow) -> Result<Claimed, sqlx::Error> {
    let elapsed: Option<f64> = r.try_get("elapsed")?;
    Ok(Claimed {
        throttle_passed: r.try_get("throttle_passed")?,
        attempts: r.try_get("attempts")?,
        elapsed: Duration::try_from_secs_f64(elapsed.unwrap_or(0.0).max(0.0)).unwrap_or_default(),
    })
}
