//! The gateway's SQL: recording confirmations together with their outbox
//! events (a batch per statement, the requests behind the links read in it),
//! the latest mail to an address (legacy links), and the outbox itself.

use std::collections::HashMap;

use sqlx::PgPool;
use time::OffsetDateTime;
use verimail_shared::events::EMAIL_VERIFIED;

/// The latest mail sent to an address: what a legacy link (only an address
/// inside) confirms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatestMail {
    /// The request the mail answered.
    pub request_id: String,
    /// Its user.
    pub user_id: Option<String>,
}

/// The latest mail sent to each of `emails`, by address.
pub async fn latest_mails(
    conn: &mut sqlx::PgConnection,
    emails: &[&str],
) -> Result<HashMap<String, LatestMail>, sqlx::Error> {
    if emails.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT DISTINCT ON (email) email, id, user_id FROM requests \
         WHERE email = ANY($1) AND sent_at IS NOT NULL ORDER BY email, sent_at DESC",
    )
    .bind(emails)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(email, request_id, user_id)| {
            (
                email,
                LatestMail {
                    request_id,
                    user_id,
                },
            )
        })
        .collect())
}

/// Whether the link with this confirmation key was confirmed already.
pub async fn is_confirmed(pool: &PgPool, key: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM confirmations WHERE key = $1)")
        .bind(key)
        .fetch_one(pool)
        .await
}

/// A confirmation to record.
#[derive(Debug)]
pub struct NewConfirmation<'a> {
    /// `r:{request_id}` or `e:{email}`; unique within one call.
    pub key: &'a str,
    /// The request id, when known; its `requests` row supplies the event's
    /// `context` and the answer's `return_url`.
    pub request_id: Option<&'a str>,
    /// The user, when known.
    pub user_id: Option<&'a str>,
    /// The confirmed address.
    pub email: &'a str,
    /// The purpose confirmed.
    pub purpose: &'a str,
    /// The verified event's id (UUIDv7).
    pub event_id: String,
    /// When.
    pub verified_at: OffsetDateTime,
    /// The serialized CloudEvent up to its `context` value (type
    /// `verimail.email.verified`, its routing key).
    pub head: Vec<u8>,
    /// The serialized CloudEvent after its `context` value (`None`: `head` is
    /// the whole event, nothing to insert).
    pub tail: Option<Vec<u8>>,
}

/// What [`record_confirmations`] found for one confirmation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRow {
    /// The confirmation's key.
    pub key: String,
    /// This call confirmed it (false: it was confirmed before).
    pub inserted: bool,
    /// The `return_url` of its request, if any.
    pub return_url: Option<String>,
}

/// Records the confirmations and, for each that is the first for its key,
/// its event in the outbox, with the `context` of its `requests` row put
/// between the event's `head` and `tail` (the request is read in the same
/// statement: no lookup round trip). One statement, so every row commits
/// together or none does (and one commit, one WAL flush, serves them all); a
/// concurrent click on the same key waits on the key's lock and inserts
/// nothing. Rows are inserted in key order, so two calls sharing keys take
/// their locks in the same order and never deadlock.
pub async fn record_confirmations(
    conn: &mut sqlx::PgConnection,
    rows: &[NewConfirmation<'_>],
) -> Result<Vec<RecordedRow>, sqlx::Error> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<&str> = rows.iter().map(|c| c.key).collect();
    let request_ids: Vec<Option<&str>> = rows.iter().map(|c| c.request_id).collect();
    let user_ids: Vec<Option<&str>> = rows.iter().map(|c| c.user_id).collect();
    let emails: Vec<&str> = rows.iter().map(|c| c.email).collect();
    let purposes: Vec<&str> = rows.iter().map(|c| c.purpose).collect();
    let event_ids: Vec<&str> = rows.iter().map(|c| c.event_id.as_str()).collect();
    let times: Vec<OffsetDateTime> = rows.iter().map(|c| c.verified_at).collect();
    let heads: Vec<&[u8]> = rows.iter().map(|c| c.head.as_slice()).collect();
    let tails: Vec<Option<&[u8]>> = rows.iter().map(|c| c.tail.as_deref()).collect();
    // Data-modifying CTEs run exactly once whether or not the final SELECT
    // reads them: the outbox row of each inserted confirmation is part of
    // this statement. `jsonb::text` is valid JSON (its own spacing and key
    // order, which JSON leaves free).
    let found: Vec<(String, bool, Option<String>)> = sqlx::query_as(
        "WITH input AS ( \
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
                                  $6::text[], $7::timestamptz[], $8::bytea[], $9::bytea[]) \
               AS i(key, request_id, user_id, email, purpose, event_id, verified_at, head, tail) \
         ), found AS ( \
             SELECT i.key, i.event_id, i.verified_at, i.head, i.tail, r.return_url, r.context \
             FROM input i LEFT JOIN requests r ON r.id = i.request_id \
         ), confirmed AS ( \
             INSERT INTO confirmations (key, request_id, user_id, email, purpose, event_id, verified_at) \
             SELECT key, request_id, user_id, email, purpose, event_id, verified_at \
             FROM input ORDER BY key \
             ON CONFLICT (key) DO NOTHING \
             RETURNING key \
         ), queued AS ( \
             INSERT INTO outbox (id, routing_key, body, created_at) \
             SELECT f.event_id, $10, \
                    CASE WHEN f.tail IS NULL THEN f.head ELSE \
                      f.head || convert_to(coalesce(f.context::text, 'null'), 'UTF8') || f.tail \
                    END, \
                    f.verified_at \
             FROM found f JOIN confirmed c ON c.key = f.key \
         ) \
         SELECT f.key, c.key IS NOT NULL, f.return_url \
         FROM found f LEFT JOIN confirmed c ON c.key = f.key",
    )
    .bind(&keys)
    .bind(&request_ids)
    .bind(&user_ids)
    .bind(&emails)
    .bind(&purposes)
    .bind(&event_ids)
    .bind(&times)
    .bind(&heads)
    .bind(&tails)
    .bind(EMAIL_VERIFIED)
    .fetch_all(conn)
    .await?;
    Ok(found
        .into_iter()
        .map(|(key, inserted, return_url)| RecordedRow {
            key,
            inserted,
            return_url,
        })
        .collect())
}

/// Up to this many outbox rows are counted exactly; beyond, the planner's
/// estimate is used.
pub const BACKLOG_EXACT: i64 = 1000;

/// Rows waiting in the outbox, read cheaply: a `count(*)` of the whole table
/// every second would read every row of a large backlog (events nobody is
/// subscribed to pile up for `RETENTION_HOURS`) each time. So at most
/// [`BACKLOG_EXACT`] rows are counted, which is exact while the backlog is
/// small (the case that matters to see it drain), and a larger backlog is
/// read from the table's statistics, scaled to its current size as the
/// planner does: approximate, but a gauge to alert on, not a ledger.
pub async fn outbox_backlog(conn: impl sqlx::PgExecutor<'_>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT CASE WHEN a.n < $1 THEN a.n ELSE greatest(a.n, b.est) END FROM \
           (SELECT count(*) AS n FROM (SELECT 1 FROM outbox LIMIT $1) t) a, \
           (SELECT CASE WHEN c.reltuples > 0 AND c.relpages > 0 \
                   THEN (c.reltuples / c.relpages \
                         * (pg_relation_size(c.oid) / current_setting('block_size')::bigint))::bigint \
                   ELSE 0 END AS est \
            FROM pg_class c WHERE c.oid = 'outbox'::regclass) b",
    )
    .bind(BACKLOG_EXACT)
    .fetch_one(conn)
    .await
}

/// Rows deleted per statement by [`expire_outbox`].
pub const EXPIRE_BATCH: i64 = 1000;

/// The smallest UUIDv7 text of the millisecond `at`: every event id (a
/// UUIDv7, which begins with its creation time) created before `at` sorts
/// below it, so the primary key finds expired rows without an index on
/// `created_at` (dropped to spare each click an index entry).
pub fn first_id_at(at: OffsetDateTime) -> String {
    let ms = (at.unix_timestamp_nanos() / 1_000_000).clamp(0, (1 << 48) - 1) as u128;
    uuid::Uuid::from_u128((ms << 80) | (0x7 << 76)).to_string()
}

/// Deletes outbox rows older than `retention`, [`EXPIRE_BATCH`] per
/// statement; returns how many went. `created_at` is checked too, so a row
/// whose id were not time-ordered would never go early.
pub async fn expire_outbox(
    pool: &PgPool,
    retention: std::time::Duration,
) -> Result<u64, sqlx::Error> {
    let cutoff = OffsetDateTime::now_utc() - retention;
    let first_kept = first_id_at(cutoff);
    let mut total = 0;
    loop {
        let deleted = sqlx::query(
            "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox \
               WHERE id < $1 AND created_at < $2 ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED)",
        )
        .bind(&first_kept)
        .bind(cutoff)
        .bind(EXPIRE_BATCH)
        .execute(pool)
        .await?
        .rows_affected();
        total += deleted;
        if deleted < EXPIRE_BATCH as u64 {
            return Ok(total);
        }
    }
}

/// The code of the latest mail sent to a user for a purpose
/// ([`latest_code`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailCode {
    /// The request the mail answered.
    pub request_id: String,
    /// The address it went to.
    pub email: String,
    /// The keyed hash of its code; `None`: the mail carried no code
    /// (`CONFIRM_METHOD=link` when it was sent).
    pub code_hash: Option<Vec<u8>>,
    /// Wrong tries counted on it so far.
    pub attempts: i32,
    /// When the mail was accepted (a code lives `TOKEN_TTL_SECONDS` from then).
    pub sent_at: OffsetDateTime,
    /// Its link or code was confirmed already (or, for `verify_email`, the
    /// address by a legacy link).
    pub confirmed: bool,
}

/// The code of the latest mail sent to `user_id` for `purpose`, with whether
/// it was confirmed: one statement, served by `requests_user_purpose` (the
/// user's few requests for the purpose, sorted here by when each was sent)
/// and the confirmations' primary key.
pub async fn latest_code(
    pool: &PgPool,
    user_id: &str,
    purpose: &str,
) -> Result<Option<MailCode>, sqlx::Error> {
    type Row = (String, String, Option<Vec<u8>>, i32, OffsetDateTime, bool);
    let row: Option<Row> = sqlx::query_as(
        "SELECT r.id, coalesce(r.email, ''), r.code_hash, r.code_attempts, r.sent_at, \
                EXISTS (SELECT 1 FROM confirmations c \
                        WHERE c.key IN ('r:' || r.id, \
                                        CASE WHEN r.purpose = 'verify_email' \
                                             THEN 'e:' || r.email END)) \
         FROM requests r \
         WHERE r.user_id = $1 AND r.purpose = $2 AND r.sent_at IS NOT NULL \
         ORDER BY r.sent_at DESC, r.id DESC LIMIT 1",
    )
    .bind(user_id)
    .bind(purpose)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(
        |(request_id, email, code_hash, attempts, sent_at, confirmed)| MailCode {
            request_id,
            email,
            code_hash,
            attempts,
            sent_at,
            confirmed,
        },
    ))
}

/// Counts one wrong try on the code `code_hash` of request `request_id`,
/// unless `max` tries were counted already: one conditional UPDATE, so
/// however many gateways race on one code, the row lock serializes them and
/// no more than `max` tries are ever counted. Returns the count after this
/// try, or `None` when the code is locked (or was replaced meanwhile by a
/// new mail for the same request).
pub async fn count_wrong_try(
    pool: &PgPool,
    request_id: &str,
    code_hash: &[u8],
    max: i32,
) -> Result<Option<i32>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE requests SET code_attempts = code_attempts + 1 \
         WHERE id = $1 AND code_hash = $2 AND code_attempts < $3 \
         RETURNING code_attempts",
    )
    .bind(request_id)
    .bind(code_hash)
    .bind(max)
    .fetch_optional(pool)
    .await
}
