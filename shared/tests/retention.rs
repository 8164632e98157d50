//! Retention against a real PostgreSQL: old rows go, fresh ones and
//! unfinished requests stay.

use std::time::Duration;

use verimail_shared::retention;

mod support;
use support::{drop_db, fresh_db};

async fn count(pool: &sqlx::PgPool, table: &str) -> i64 {
    let sql = format!("SELECT count(*) FROM {table}");
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_one(pool)
        .await
        .expect("count")
}

#[tokio::test]
async fn old_records_are_deleted_in_batches_and_fresh_ones_stay() {
    let (pool, name) = fresh_db("retention").await;
    // 2,500 old finished requests (more than two batches), 3 fresh, 2 old but unfinished.
    sqlx::query(
        "INSERT INTO requests (id, state, created_at) \
         SELECT 'old-' || g, 'done', now() - interval '10 days' FROM generate_series(1, 2500) g",
    )
    .execute(&pool)
    .await
    .expect("old requests");
    sqlx::query(
        "INSERT INTO requests (id, state, created_at) VALUES \
         ('fresh-1','done',now()), ('fresh-2','done',now()), ('fresh-3','processing',now()), \
         ('stuck-1','processing',now() - interval '10 days'), ('stuck-2','processing',now() - interval '10 days')",
    )
    .execute(&pool)
    .await
    .expect("fresh requests");
    sqlx::query(
        "INSERT INTO throttle VALUES ('u1','verify_email',now() - interval '10 days','old-1'), \
         ('u2','verify_email',now(),'fresh-1')",
    )
    .execute(&pool)
    .await
    .expect("throttle");
    sqlx::query(
        "INSERT INTO confirmations (key, email, purpose, event_id, verified_at) VALUES \
         ('r:old-1','a@example.com','verify_email','e1',now() - interval '10 days'), \
         ('r:fresh-1','b@example.com','verify_email','e2',now())",
    )
    .execute(&pool)
    .await
    .expect("confirmations");
    // Suppressions are never swept, however old; webhook receipts are.
    sqlx::query(
        "INSERT INTO suppressions (email, reason, source, created_at) VALUES \
         ('dead@example.com','bounce','ses',now() - interval '400 days')",
    )
    .execute(&pool)
    .await
    .expect("suppressions");
    // Published marks go with their request.
    sqlx::query(
        "INSERT INTO published (request_id, outcome_id) VALUES \
         ('old-1','o1'), ('old-2','o2'), ('fresh-1','o3')",
    )
    .execute(&pool)
    .await
    .expect("published marks");
    // So do the provider's ids of mails sent through an HTTP API.
    sqlx::query(
        "INSERT INTO provider_messages (provider_message_id, request_id) VALUES \
         ('pm-1','old-1'), ('pm-3','fresh-1')",
    )
    .execute(&pool)
    .await
    .expect("provider message ids");
    sqlx::query(
        "INSERT INTO webhook_receipts (provider, event_key, received_at) VALUES \
         ('ses','old',now() - interval '10 days'), ('ses','new',now())",
    )
    .execute(&pool)
    .await
    .expect("receipts");

    let swept = retention::sweep(&pool, Duration::from_secs(168 * 3600))
        .await
        .expect("sweep");
    assert_eq!(swept.requests, 2500);
    assert_eq!(swept.throttle, 1);
    assert_eq!(swept.confirmations, 1);
    assert_eq!(
        count(&pool, "requests").await,
        5,
        "fresh and unfinished requests stay"
    );
    assert_eq!(count(&pool, "throttle").await, 1);
    assert_eq!(count(&pool, "confirmations").await, 1);
    assert_eq!(
        count(&pool, "published").await,
        1,
        "the marks of deleted requests go, a kept request's stays"
    );
    assert_eq!(
        count(&pool, "provider_messages").await,
        1,
        "the provider ids of deleted requests go, a kept request's stays"
    );
    assert_eq!(swept.webhook_receipts, 1);
    assert_eq!(count(&pool, "webhook_receipts").await, 1);
    assert_eq!(count(&pool, "suppressions").await, 1, "suppressions stay");

    // A second sweep finds nothing more.
    let again = retention::sweep(&pool, Duration::from_secs(168 * 3600))
        .await
        .expect("sweep");
    assert_eq!(again, retention::Swept::default());
    pool.close().await;
    drop_db(&name).await;
}
