//! The batch statements: many deliveries' claims, or their conclusions and
//! published marks, in one statement and one commit.

use std::time::Duration;

use sqlx::Row;
use sqlx::postgres::PgConnection;
use time::OffsetDateTime;

use verimail_shared::suppression::SuppressionReason;

use super::{Claimed, Finish, RequestRow, Store};
use crate::batch::{self, Keyed};

impl Store {
    /// [`Store::claim`] for many requests in one statement (one commit).
    /// Answers in input order: `Some` when claimed, `None` when the request
    /// could not be claimed (the caller then runs [`Store::lookup`]).
    ///
    /// The inputs must not share a request id, nor a throttle key
    /// (`user_id`, `purpose`) among those with a throttle: a statement cannot
    /// touch one row twice, and the throttle must let exactly one of two
    /// requests for one user through. [`BatchedStore`] sees to that.
    pub async fn claim_batch(
        &self,
        inputs: &[ClaimInput],
    ) -> Result<Vec<Option<Claimed>>, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        self.claim_batch_on(&mut conn, inputs).await
    }

    /// [`Store::claim_batch`] on a given connection.
    pub(super) async fn claim_batch_on(
        &self,
        conn: &mut PgConnection,
        inputs: &[ClaimInput],
    ) -> Result<Vec<Option<Claimed>>, sqlx::Error> {
        // Over `unnest` arrays; a throttle of NULL is "no throttle" for that
        // row. Each input's address is looked up on the suppression list
        // here (`input.suppressed`, by the `lower(email)` index): a
        // suppressed request takes no throttle slot and is answered
        // `failed`/`suppressed`, with no statement of its own; the reasons
        // come back as rows of their own after the claimed ones (a
        // sub-select per returned row, scanning `input` each time, made the
        // statement quadratic in the batch, docs/performance.md). Locks are
        // taken in the order every statement here keeps (see the lock order
        // (module docs)): the existing `requests` rows in id order (`held`,
        // read whole by the first throttle row's `array_agg`), then the
        // `throttle` rows in key order (`thr`, run whole before the INSERT
        // (`claimed`) by its one-time filter), then the new `requests` rows
        // in id order. Times are `statement_timestamp()`, not `now()`: in a
        // round this statement follows the conclusions' in one transaction,
        // whose start `now()` would be, back-dating leases and throttles by
        // however long the conclusions took.
        const CLAIM_BATCH: &str = r"
WITH input AS (
    SELECT i.*, (SELECT s.reason FROM suppressions s
                 WHERE lower(s.email) = lower(i.email)) AS suppressed
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                $6::text[], $7::text[], $8::float8[])
        AS i(id, user_id, email, purpose, locale, return_url, context, throttle)
),
held AS (
    SELECT r.id, (r.state = 'done' OR r.throttle_passed OR r.lease_until >= statement_timestamp()
                  OR (r.lease_until IS NOT NULL AND r.id <> ALL ($10::text[]))) AS settled
    FROM requests r WHERE r.id = ANY($1::text[])
    ORDER BY r.id
    FOR UPDATE
),
thr AS (
    INSERT INTO throttle AS t (user_id, purpose, last_sent_at, request_id)
    SELECT i.user_id, i.purpose, statement_timestamp(), i.id FROM input i
    WHERE i.throttle IS NOT NULL AND i.suppressed IS NULL
      AND i.id <> ALL (COALESCE((SELECT array_agg(h.id) FILTER (WHERE h.settled) FROM held h),
                                '{}'::text[]))
    ORDER BY i.user_id, i.purpose
    ON CONFLICT (user_id, purpose) DO UPDATE
        SET last_sent_at = statement_timestamp(), request_id = EXCLUDED.request_id
        WHERE t.last_sent_at <= statement_timestamp() - (SELECT i.throttle FROM input i
                                         WHERE i.id = EXCLUDED.request_id) * interval '1 second'
           OR t.request_id = EXCLUDED.request_id
    RETURNING t.request_id
),
claimed AS (
INSERT INTO requests AS r (id, user_id, email, purpose, locale, return_url, context,
                           lease_until, first_attempt_at, throttle_passed)
SELECT i.id, i.user_id, i.email, i.purpose, i.locale, i.return_url, i.context::jsonb,
       statement_timestamp() + $9::float8 * interval '1 second', statement_timestamp(),
       i.suppressed IS NULL AND (i.throttle IS NULL OR i.id IN (SELECT request_id FROM thr))
FROM input i
WHERE (SELECT count(*) FROM thr) >= 0
ORDER BY i.id
ON CONFLICT (id) DO UPDATE
    SET lease_until = EXCLUDED.lease_until,
        throttle_passed = r.throttle_passed OR EXCLUDED.throttle_passed,
        first_attempt_at = COALESCE(r.first_attempt_at, EXCLUDED.first_attempt_at)
    WHERE r.state = 'processing'
      AND (r.lease_until IS NULL OR (r.lease_until < statement_timestamp() AND r.id = ANY ($10::text[])))
RETURNING r.id, r.throttle_passed, r.attempts,
          EXTRACT(EPOCH FROM (statement_timestamp() - r.first_attempt_at))::float8 AS elapsed
)
SELECT c.id, c.throttle_passed, c.attempts, c.elapsed, NULL::text AS suppressed FROM claimed c
UNION ALL
SELECT i.id, NULL::boolean, NULL::int4, NULL::float8, i.suppressed FROM input i
WHERE i.suppressed IS NOT NULL";
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
        // Two kinds of rows: the claimed requests, and the suppressed
        // addresses' reasons (a row with no `throttle_passed`).
        // foldhash: keyed by request ids, looked up once each; the maps
        // live for one batch.
        let mut claimed =
            foldhash::HashMap::with_capacity_and_hasher(rows.len(), Default::default());
        let mut reasons = foldhash::HashMap::default();
        for r in &rows {
            let id: String = r.try_get("id")?;
            match r.try_get::<Option<bool>, _>("throttle_passed")? {
                Some(_) => {
                    claimed.insert(id, claimed_from(r)?);
                }
                None => {
                    reasons.insert(id, suppression_reason(r.try_get("suppressed")?));
                }
            }
        }
        Ok(inputs
            .iter()
            .map(|i| {
                let mut c = claimed.remove(&i.id)?;
                c.suppressed = reasons.remove(&i.id).flatten();
                Some(c)
            })
            .collect())
    }

    /// [`Store::finish`] and [`Store::mark_published`] for many requests in
    /// one statement (one commit); answers in input order (a mark answers
    /// `true`). The inputs must not share a request id. Unlike
    /// [`Store::finish`], a request already concluded with these very bytes
    /// answers `false` (see [`LookBack`]).
    pub async fn finish_batch(&self, inputs: &[Write]) -> Result<Vec<bool>, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        self.finish_batch_on(&mut conn, inputs, LookBack::No).await
    }

    /// [`Store::finish_batch`] on a given connection.
    pub(super) async fn finish_batch_on(
        &self,
        conn: &mut PgConnection,
        inputs: &[Write],
        look_back: LookBack,
    ) -> Result<Vec<bool>, sqlx::Error> {
        // The marks of outcomes published since the previous batch ride along
        // (`marked`): under load that saves a statement, a round trip and a
        // commit per batch. A statement runs every data-modifying CTE, read
        // or not. Locks follow the lock order (module docs): every `requests`
        // row the batch finishes in id order first (`held`, run whole by the
        // main query's one-time filter), then the `throttle` rows in key order
        // (`thr`, read by `touched` and `released`): only those a conclusion
        // refreshes or releases, as a row lock is a write of its own (the
        // common mail, sent within a second of its claim, needs neither).
        const FINISH_BATCH: &str = r"
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::timestamptz[],
                         $5::int4[], $6::bool[], $9::bytea[], $10::text[], $11::text[])
        AS i(id, outcome_type, outcome, sent_at, attempted, release_throttle, code_hash,
             provider_message_id, suppress)
),
held AS (
    SELECT id FROM requests WHERE id = ANY($1::text[])
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
    RETURNING r.id, r.user_id, r.purpose, r.email, i.sent_at, i.release_throttle, i.suppress,
              i.provider_message_id
),
thr AS (
    SELECT t.user_id, t.purpose, r.sent_at, r.release_throttle
    FROM throttle t JOIN r ON t.user_id = r.user_id AND t.purpose = r.purpose
                          AND t.request_id = r.id
    WHERE r.release_throttle
       OR (r.sent_at IS NOT NULL AND t.last_sent_at < r.sent_at - interval '1 second')
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
-- The provider's id of a mail sent through an HTTP API, in a narrow table of
-- its own (`shared/migrations/20261207000021_hot_conclusion.sql`): no column
-- the conclusion writes in `requests` is indexed, so its update stays on the
-- row's page and adds no index entry.
messages AS (
    INSERT INTO provider_messages (provider_message_id, request_id)
    SELECT r.provider_message_id, r.id FROM r WHERE r.provider_message_id IS NOT NULL
    ON CONFLICT DO NOTHING
    RETURNING 1
),
-- SUPPRESS_ON_REJECT: the refused recipient goes on the list with the
-- conclusion (an address already there keeps its entry). Its unique index
-- is the last lock taken, after every `requests` and `throttle` row.
suppressed AS (
    INSERT INTO suppressions (email, reason, source, detail)
    SELECT DISTINCT ON (lower(r.email)) r.email, 'recipient_rejected', 'worker', r.suppress
    FROM r WHERE r.suppress IS NOT NULL AND r.email IS NOT NULL
    ORDER BY lower(r.email)
    ON CONFLICT ((lower(email))) DO NOTHING
    RETURNING 1
),
-- The marks: one narrow row each, keyed by request and outcome (see
-- `shared/migrations/20261206000020_published.sql`), so a mark touches no
-- `requests` row and takes no lock but its own key's.
marked AS (
    INSERT INTO published (request_id, outcome_id)
    SELECT * FROM unnest($8::text[], $12::text[])
    ON CONFLICT DO NOTHING
    RETURNING 1
),
-- Already stored with these very bytes (an outcome id is unique), when the
-- caller asks ($13, `LookBack`): a batch whose caller gave up on it
-- committed after all, and the caller's own statement must hear `true` to
-- publish it.
same AS (
    SELECT q.id FROM requests q JOIN input i ON q.id = i.id
    WHERE $13::bool AND q.state = 'done' AND q.outcome = i.outcome
)
SELECT id FROM r WHERE (SELECT count(*) FROM held) >= 0
UNION ALL
SELECT id FROM same";
        let (mut order, mut marks, mut outcome_ids) = (Vec::new(), Vec::new(), Vec::new());
        for c in inputs {
            match c {
                Write::Finish(f) => order.push(f),
                Write::MarkPublished(m) => {
                    marks.push(m.request_id.as_str());
                    outcome_ids.push(m.outcome_id.as_str());
                }
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
            .bind(
                order
                    .iter()
                    .map(|i| i.provider_message_id.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(
                order
                    .iter()
                    .map(|i| i.suppress.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(outcome_ids)
            .bind(look_back == LookBack::Yes)
            .fetch_all(conn)
            .await?;
        let done: foldhash::HashSet<&str> = rows.iter().map(String::as_str).collect();
        Ok(inputs
            .iter()
            .map(|c| match c {
                Write::Finish(f) => done.contains(f.id.as_str()),
                Write::MarkPublished(_) => true,
            })
            .collect())
    }
}

/// Whether a conclusion statement also answers `true` for a request that is
/// already `done` with the very bytes it stores. The single-request
/// statement ([`Store::finish`]) does: it is how a delivery learns that a
/// batch it gave up on committed its outcome after all. Batches do not: the
/// look-up cost a primary-key search per row on every batch for a case a
/// batch never needs to settle, since [`BatchedStore::finish`] hears `false`
/// and asks the single statement, on a fresh snapshot (docs/performance.md).
///
/// [`BatchedStore::finish`]: super::BatchedStore::finish
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookBack {
    /// Answer `true` for an outcome already stored with these bytes.
    Yes,
    /// Answer `true` only for rows this statement concludes.
    No,
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
    provider_message_id: Option<String>,
    attempted: bool,
    release_throttle: bool,
    suppress: Option<String>,
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
            provider_message_id: f.provider_message_id.map(str::to_owned),
            attempted: f.attempted,
            release_throttle: f.release_throttle,
            suppress: f.suppress.map(str::to_owned),
        }
    }
}

/// A write of the conclusions' batch: store an outcome, or record that the
/// broker confirmed one.
#[derive(Debug, Clone)]
pub enum Write {
    /// [`Store::finish`].
    Finish(FinishInput),
    /// [`Store::mark_published`].
    MarkPublished(Mark),
}

/// An outcome the broker confirmed: which request's, and which event (a
/// replayed request is concluded again with a new one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    /// The request id.
    pub request_id: String,
    /// The outcome event's id.
    pub outcome_id: String,
}

impl Mark {
    /// The mark of outcome `outcome_id` of request `request_id`.
    pub fn new(request_id: &str, outcome_id: &str) -> Self {
        Self {
            request_id: request_id.to_owned(),
            outcome_id: outcome_id.to_owned(),
        }
    }
}

impl Keyed for Write {
    fn keys(&self) -> [u64; 2] {
        let id = match self {
            Write::Finish(f) => &f.id,
            Write::MarkPublished(m) => &m.request_id,
        };
        [batch::key("id", &[id]), 0]
    }
}

/// A suppression list entry's reason as stored; an unknown one (a newer
/// release's) still suppresses.
fn suppression_reason(stored: Option<String>) -> Option<SuppressionReason> {
    stored.map(|s| s.parse().unwrap_or(SuppressionReason::Manual))
}

pub(super) fn claimed_from(r: &sqlx::postgres::PgRow) -> Result<Claimed, sqlx::Error> {
    let elapsed: Option<f64> = r.try_get("elapsed")?;
    Ok(Claimed {
        suppressed: suppression_reason(r.try_get("suppressed")?),
        throttle_passed: r.try_get("throttle_passed")?,
        attempts: r.try_get("attempts")?,
        elapsed: Duration::try_from_secs_f64(elapsed.unwrap_or(0.0).max(0.0)).unwrap_or_default(),
    })
}
