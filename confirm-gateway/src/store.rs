//! The gateway's SQL: reading the request behind a link, recording a
//! confirmation together with its outbox event, and the outbox itself.

use serde_json::{Map, Value};
use sqlx::PgPool;
use sqlx::types::Json;
use time::OffsetDateTime;

/// What the `requests` row of a link tells the gateway.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestInfo {
    /// The request id (for legacy tokens, found by address).
    pub request_id: Option<String>,
    /// The user (for legacy tokens, found by address).
    pub user_id: Option<String>,
    /// Where to send the browser after confirming.
    pub return_url: Option<String>,
    /// The request's context, echoed on the verified event.
    pub context: Option<Map<String, Value>>,
}

type Row = (
    String,
    Option<String>,
    Option<String>,
    Option<Json<Map<String, Value>>>,
);

fn info((id, user_id, return_url, context): Row) -> RequestInfo {
    RequestInfo {
        request_id: Some(id),
        user_id,
        return_url,
        context: context.map(|Json(c)| c),
    }
}

/// The `requests` row with this id, if the worker recorded one.
pub async fn request_by_id(pool: &PgPool, id: &str) -> Result<Option<RequestInfo>, sqlx::Error> {
    let row: Option<Row> =
        sqlx::query_as("SELECT id, user_id, return_url, context FROM requests WHERE id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await?;
    Ok(row.map(info))
}

/// The latest mail sent to `email` (legacy tokens carry only the address).
pub async fn latest_request_for_email(
    pool: &PgPool,
    email: &str,
) -> Result<Option<RequestInfo>, sqlx::Error> {
    let row: Option<Row> = sqlx::query_as(
        "SELECT id, user_id, return_url, context FROM requests \
         WHERE email = $1 AND sent_at IS NOT NULL ORDER BY sent_at DESC LIMIT 1",
    )
    .bind(email)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(info))
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
    /// `r:{request_id}` or `e:{email}`.
    pub key: &'a str,
    /// The request id, when known.
    pub request_id: Option<&'a str>,
    /// The user, when known.
    pub user_id: Option<&'a str>,
    /// The confirmed address.
    pub email: &'a str,
    /// The purpose confirmed.
    pub purpose: &'a str,
    /// The verified event's id (UUIDv7).
    pub event_id: &'a str,
    /// When.
    pub verified_at: OffsetDateTime,
    /// The routing key of the event (its type).
    pub routing_key: &'a str,
    /// The serialized CloudEvent.
    pub body: &'a [u8],
}

/// Records the confirmation and, only if it is the first for its key, its
/// event in the outbox. One statement, so both rows commit together or not at
/// all; a concurrent second click waits on the key's lock and inserts nothing.
/// Returns whether this call confirmed (false: confirmed before).
pub async fn record_confirmation(
    pool: &PgPool,
    c: &NewConfirmation<'_>,
) -> Result<bool, sqlx::Error> {
    let inserted: Option<String> = sqlx::query_scalar(
        "WITH confirmed AS ( \
             INSERT INTO confirmations (key, request_id, user_id, email, purpose, event_id, verified_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (key) DO NOTHING \
             RETURNING event_id, verified_at \
         ) \
         INSERT INTO outbox (id, routing_key, body, created_at) \
         SELECT event_id, $8, $9, verified_at FROM confirmed \
         RETURNING id",
    )
    .bind(c.key)
    .bind(c.request_id)
    .bind(c.user_id)
    .bind(c.email)
    .bind(c.purpose)
    .bind(c.event_id)
    .bind(c.verified_at)
    .bind(c.routing_key)
    .bind(c.body)
    .fetch_optional(pool)
    .await?;
    Ok(inserted.is_some())
}

/// Rows waiting in the outbox.
pub async fn outbox_backlog(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(pool)
        .await
}
