//! What piles up in the outbox: unpublished events older than the retention
//! are dropped and counted, and the backlog gauge is read without counting
//! every row.

use std::collections::HashSet;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use verimail_gateway::BusSlot;

use verimail_shared::events::EMAIL_VERIFIED;

use crate::common::*;
use crate::{Subscriber, exchange_only};

/// A row as the gateway writes it, but created `age` ago (its UUIDv7 id too).
async fn insert_aged_event(app: &TestApp, age: Duration) -> String {
    let at = time::OffsetDateTime::now_utc() - age;
    let ms = (at.unix_timestamp_nanos() / 1_000_000) as u128;
    let id = uuid::Uuid::from_u128((ms << 80) | (0x7 << 76) | u128::from(rand_low())).to_string();
    let body = serde_json::json!({"specversion": "1.0", "id": id, "type": EMAIL_VERIFIED});
    sqlx::query("INSERT INTO outbox (id, routing_key, body, created_at) VALUES ($1, $2, $3, $4)")
        .bind(&id)
        .bind(EMAIL_VERIFIED)
        .bind(body.to_string().into_bytes())
        .bind(at)
        .execute(app.pool())
        .await
        .expect("insert an aged event");
    id
}

fn rand_low() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().1
}

#[tokio::test]
async fn unpublished_events_older_than_the_retention_are_dropped_and_counted() {
    let (_, _, namespace) = config(&[]);
    let app = TestApp::new(&[
        ("VERIMAIL_NAMESPACE", &namespace),
        ("RETENTION_HOURS", "1"),
        ("TOKEN_TTL_SECONDS", "60"),
    ])
    .await;
    let mut old = HashSet::new();
    for _ in 0..3 {
        old.insert(insert_aged_event(&app, Duration::from_secs(2 * 3600)).await);
    }
    for i in 0..2 {
        let answer = app
            .get(&format!(
                "/confirm/{}",
                app.token(&format!("f{i}"), "verify_email")
            ))
            .await;
        assert_eq!(answer.status, 200);
    }
    let fresh: HashSet<String> = app
        .outbox()
        .await
        .into_iter()
        .map(|(id, _)| id)
        .filter(|id| !old.contains(id))
        .collect();
    assert_eq!(fresh.len(), 2);

    // The exchange exists, but nobody is subscribed: nothing can be published.
    let bus = exchange_only(&namespace, "relay-expiry").await;
    let mut relay = app.state.relay();
    relay.bus = BusSlot::with(bus.clone());
    let stop = CancellationToken::new();
    let running = tokio::spawn(relay.run(stop.clone()));

    let metrics = app.state.metrics().clone();
    assert!(
        eventually(Duration::from_secs(10), || {
            let text = metrics.render();
            async move { text.contains("verimail_gateway_outbox_expired_total 3") }
        })
        .await,
        "{}",
        app.state.metrics().render()
    );
    let left: HashSet<String> = app.outbox().await.into_iter().map(|(id, _)| id).collect();
    assert_eq!(left, fresh, "only the events within the retention are kept");

    // A subscriber binds: the kept events go out, the dropped ones never.
    let sub = Subscriber::new(&namespace).await;
    app.state.relay().wake.notify_one();
    let mut got = HashSet::new();
    while let Some(r) = sub.next(Duration::from_secs(15)).await {
        got.insert(r.message_id);
        if got.len() == fresh.len() {
            break;
        }
    }
    assert_eq!(got, fresh);

    stop.cancel();
    running.await.expect("the relay stops");
    bus.close().await;
    sub.cleanup().await;
    app.cleanup().await;
}

#[tokio::test]
async fn the_backlog_is_read_without_counting_every_row() {
    use verimail_gateway::store::{BACKLOG_EXACT, outbox_backlog};
    let app = TestApp::new(&[]).await;
    for _ in 0..3 {
        insert_aged_event(&app, Duration::ZERO).await;
    }
    assert_eq!(
        outbox_backlog(app.pool()).await.expect("backlog"),
        3,
        "exact when small"
    );

    sqlx::query(
        "INSERT INTO outbox (id, routing_key, body) \
         SELECT 'bulk-' || lpad(g::text, 6, '0'), $1, '{}'::bytea FROM generate_series(1, 20000) g",
    )
    .bind(EMAIL_VERIFIED)
    .execute(app.pool())
    .await
    .expect("a large backlog");
    sqlx::query("ANALYZE outbox")
        .execute(app.pool())
        .await
        .expect("analyze");
    // Tuples read by the one statement, from this transaction's statistics.
    let mut tx = app.pool().begin().await.expect("begin");
    let backlog = outbox_backlog(&mut *tx).await.expect("backlog");
    let read: i64 = sqlx::query_scalar(
        "SELECT (pg_stat_get_xact_tuples_returned('outbox'::regclass) \
               + pg_stat_get_xact_tuples_fetched('outbox'::regclass) \
               + pg_stat_get_xact_tuples_returned('outbox_pkey'::regclass) \
               + pg_stat_get_xact_tuples_fetched('outbox_pkey'::regclass))::bigint",
    )
    .fetch_one(&mut *tx)
    .await
    .expect("statistics");
    tx.rollback().await.expect("rollback");
    assert!(
        read <= 2 * BACKLOG_EXACT,
        "read {read} tuples for a backlog of 20,003"
    );
    assert!(
        (18_000..=22_000).contains(&backlog),
        "estimate {backlog} for 20,003 rows"
    );
    app.cleanup().await;
}
