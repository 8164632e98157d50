//! Every SQL statement the worker runs, against the `requests` and `throttle`
//! tables (see `shared/migrations/20261126000001_core.sql`).
//!
//! A request row moves `processing` → `done` once. While `processing`, a worker
//! holds it through `lease_until`; a redelivery may take it over only once the
//! lease has run out (the previous holder crashed). The common path costs three
//! statements: [`Store::claim`] (claim and throttle in one round trip),
//! [`Store::finish`] (outcome stored with `state = 'done'`) and
//! [`Store::mark_published`].

use std::time::Duration;

use serde_json::{Map, Value};
use sqlx::{PgPool, Row};
use time::OffsetDateTime;

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
        const CLAIM: &str = r"
WITH prior AS (
    SELECT state, lease_until, throttle_passed FROM requests WHERE id = $1
),
thr AS (
    INSERT INTO throttle AS t (user_id, purpose, last_sent_at, request_id)
    SELECT $2, $4, now(), $1
    WHERE $9 AND NOT EXISTS (
        SELECT 1 FROM prior
        WHERE state = 'done' OR throttle_passed OR lease_until >= now())
    ON CONFLICT (user_id, purpose) DO UPDATE
        SET last_sent_at = now(), request_id = EXCLUDED.request_id
        WHERE t.last_sent_at <= now() - $10::float8 * interval '1 second'
           OR t.request_id = EXCLUDED.request_id
    RETURNING true AS passed
)
INSERT INTO requests AS r (id, user_id, email, purpose, locale, return_url, context,
                           lease_until, first_attempt_at, throttle_passed)
VALUES ($1, $2, $3, $4, $5, $6, $7, now() + $8::float8 * interval '1 second', now(),
        NOT $9 OR EXISTS (SELECT 1 FROM thr))
ON CONFLICT (id) DO UPDATE
    SET lease_until = EXCLUDED.lease_until,
        throttle_passed = r.throttle_passed OR EXCLUDED.throttle_passed,
        first_attempt_at = COALESCE(r.first_attempt_at, EXCLUDED.first_attempt_at)
    WHERE r.state = 'processing' AND (r.lease_until IS NULL OR r.lease_until < now())
RETURNING r.throttle_passed, r.attempts,
          EXTRACT(EPOCH FROM (now() - r.first_attempt_at))::float8 AS elapsed";
        let context = row.context.map(|c| Value::Object(c.clone()));
        let claimed = sqlx::query(CLAIM)
            .bind(row.id)
            .bind(row.user_id)
            .bind(row.email)
            .bind(row.purpose)
            .bind(row.locale)
            .bind(row.return_url)
            .bind(context)
            .bind(self.lease.as_secs_f64())
            .bind(throttle.is_some())
            .bind(throttle.unwrap_or_default().as_secs_f64())
            .fetch_optional(&self.pool)
            .await?;
        if let Some(r) = claimed {
            return Ok(Claim::Claimed(claimed_from(&r)?));
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
    /// releasing (no mail) the throttle it holds, in one statement. The lease
    /// stays until [`Store::mark_published`], so a duplicate arriving while
    /// the outcome is being published waits instead of publishing it too. Returns
    /// `false` when the row was no longer `processing` (another delivery
    /// finished it after our lease ran out).
    pub async fn finish(&self, f: Finish<'_>) -> Result<bool, sqlx::Error> {
        const FINISH: &str = r"
WITH r AS (
    UPDATE requests
    SET state = 'done', lease_until = now() + $7::float8 * interval '1 second',
        outcome_type = $2, outcome = $3,
        sent_at = $4, attempts = attempts + $5
    WHERE id = $1 AND state = 'processing'
    RETURNING user_id, purpose
),
touched AS (
    UPDATE throttle t SET last_sent_at = $4::timestamptz
    FROM r
    WHERE $4::timestamptz IS NOT NULL
      AND t.user_id = r.user_id AND t.purpose = r.purpose AND t.request_id = $1
    RETURNING 1
),
released AS (
    DELETE FROM throttle t USING r
    WHERE $6 AND t.user_id = r.user_id AND t.purpose = r.purpose AND t.request_id = $1
    RETURNING 1
)
SELECT count(*) FROM r";
        let n: i64 = sqlx::query_scalar(FINISH)
            .bind(f.id)
            .bind(f.outcome_type)
            .bind(f.outcome)
            .bind(f.sent_at)
            .bind(i32::from(f.attempted))
            .bind(f.release_throttle)
            .bind(self.lease.as_secs_f64())
            .fetch_one(&self.pool)
            .await?;
        Ok(n > 0)
    }

    /// Records that the broker confirmed the stored outcome.
    pub async fn mark_published(&self, id: &str) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE requests SET outcome_published = true, lease_until = NULL WHERE id = $1",
        )
        .bind(id)
        .execute(&self.pool)
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

fn claimed_from(r: &sqlx::postgres::PgRow) -> Result<Claimed, sqlx::Error> {
    let elapsed: Option<f64> = r.try_get("elapsed")?;
    Ok(Claimed {
        throttle_passed: r.try_get("throttle_passed")?,
        attempts: r.try_get("attempts")?,
        elapsed: Duration::try_from_secs_f64(elapsed.unwrap_or(0.0).max(0.0)).unwrap_or_default(),
    })
}

/// Marks outcomes published in batches: under load, many deliveries finish at
/// once and one `UPDATE ... WHERE id = ANY(...)` (one commit) serves them all,
/// instead of a commit each. A lone delivery is marked at once, as before.
#[derive(Debug, Clone)]
pub struct Marker {
    tx: tokio::sync::mpsc::Sender<(String, tokio::sync::oneshot::Sender<bool>)>,
}

/// Most ids marked by one statement.
const MARK_BATCH: usize = 256;

impl Marker {
    /// Starts the batching task on `store`; it ends when every `Marker` clone is dropped.
    pub fn spawn(store: Store) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(String, tokio::sync::oneshot::Sender<bool>)>(
            MARK_BATCH * 4,
        );
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(MARK_BATCH);
            while rx.recv_many(&mut batch, MARK_BATCH).await > 0 {
                let ids: Vec<&str> = batch.iter().map(|(id, _)| id.as_str()).collect();
                let ok = sqlx::query(
                    "UPDATE requests SET outcome_published = true, lease_until = NULL
                     WHERE id = ANY($1)",
                )
                .bind(&ids)
                .execute(&store.pool)
                .await
                .is_ok();
                for (_, done) in batch.drain(..) {
                    let _ = done.send(ok);
                }
            }
        });
        Self { tx }
    }

    /// Marks `id` published; `false` when the batch failed (the caller then
    /// marks it alone, with its own retries and error reporting).
    pub async fn mark(&self, id: &str) -> bool {
        let (done, wait) = tokio::sync::oneshot::channel();
        if self.tx.send((id.to_owned(), done)).await.is_err() {
            return false;
        }
        wait.await.unwrap_or(false)
    }
}
