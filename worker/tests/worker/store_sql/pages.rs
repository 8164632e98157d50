//! Where the conclusion writes: on the row's own page, with no new index
//! entry (a heap-only, "HOT", update). A conclusion that moved the row would
//! add an entry to every index of `requests` (docs/performance.md, "The
//! conclusion stays on its page"). Read off the pages themselves with
//! `pageinspect`, which ships with PostgreSQL.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use sqlx::PgPool;
use verimail_worker::health::Health;
use verimail_worker::store::{BatchedStore, Claim, Finish, RequestRow, Store};

use super::{Db, MINUTE};
use crate::support::user;

/// `t_infomask2` flag of a row version written by a HOT update.
const HEAP_ONLY_TUPLE: i32 = 0x8000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conclusion_stays_on_its_page_and_adds_no_index_entry() -> Result<()> {
    let db = Db::new().await?;
    let batches = BatchedStore::spawn(
        Store::new(db.pool.clone(), Duration::from_secs(60)),
        Arc::new(Health::default()),
    );
    // Five mails at once, as deliveries make them: batched claims, then
    // batched conclusions with an outcome of a real one's size and a code;
    // two of them sent through an HTTP API, with the provider's message id.
    // (Five rows and their concluded versions fit one page whatever the
    // batching; a page's worth of claims concluded in one transaction finds
    // room for about four in five.)
    let ids: Vec<String> = (0..5).map(|i| format!("hot-{i}")).collect();
    let users: Vec<String> = ids.iter().map(|_| user()).collect();
    let emails: Vec<String> = users.iter().map(|u| format!("{u}@example.com")).collect();
    let outcome = vec![b'x'; 460];
    let context = serde_json::json!({"ip": "203.0.113.7"});
    let context = context.as_object();
    let mails = ids
        .iter()
        .zip(&users)
        .zip(&emails)
        .enumerate()
        .map(|(i, ((id, uid), email))| {
            let (batches, outcome) = (&batches, &outcome);
            let provider_id = (i < 2).then(|| format!("api-{id}"));
            async move {
                let row = RequestRow {
                    id,
                    user_id: Some(uid),
                    email: Some(email),
                    purpose: Some("verify_email"),
                    locale: Some("en"),
                    return_url: Some("https://app.example/welcome"),
                    context,
                };
                let claimed = batches.claim(row, MINUTE, false).await?;
                anyhow::ensure!(matches!(claimed, Claim::Claimed(c) if c.throttle_passed));
                let finished = batches
                    .finish(Finish {
                        id,
                        outcome_type: "verimail.verification.sent",
                        outcome,
                        sent_at: Some(time::OffsetDateTime::now_utc()),
                        code_hash: Some(&[7; 32]),
                        provider_message_id: provider_id.as_deref(),
                        attempted: true,
                        release_throttle: false,
                        suppress: None,
                    })
                    .await?;
                anyhow::ensure!(finished, "{id} not concluded");
                Ok(())
            }
        });
    for mail in futures_util::future::join_all(mails).await {
        mail?;
    }

    sqlx::query("CREATE EXTENSION IF NOT EXISTS pageinspect")
        .execute(&db.pool)
        .await?;
    assert_eq!(
        heap_only_versions(&db.pool).await?,
        (5, 5),
        "(live, heap-only)"
    );

    // Each B-tree of `requests` holds one entry per request (a moved row
    // would have left two); the old column for the provider's id, kept for
    // an earlier release's workers, none.
    let expected = [
        ("requests_created_at", 5),
        ("requests_email", 5),
        ("requests_pkey", 5),
        ("requests_provider_message_id", 0),
        ("requests_user_purpose", 5),
    ];
    let mut found = Vec::new();
    for (index, _) in expected {
        found.push((index, btree_entries(&db.pool, index).await?));
    }
    assert_eq!(found, expected);
    let (others,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM pg_index WHERE indrelid = 'requests'::regclass
         AND indexrelid::regclass::text <> ALL ($1)",
    )
    .bind(expected.map(|(name, _)| name))
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(others, 0, "an index of `requests` this test does not know");
    // The room the grown rows need (a mail's worth of outcome on a claim).
    let (options,): (Option<Vec<String>>,) =
        sqlx::query_as("SELECT reloptions FROM pg_class WHERE oid = 'requests'::regclass")
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(options, Some(vec!["fillfactor=30".to_owned()]));

    // The provider's ids are where a provider's notice looks for them.
    let (recorded,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM provider_messages WHERE provider_message_id = 'api-' || request_id",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(recorded, 2);
    db.drop().await;
    Ok(())
}

/// How many live row versions `requests` has, and how many of them a HOT
/// update wrote.
async fn heap_only_versions(pool: &PgPool) -> Result<(i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE (p.t_infomask2 & $1) <> 0)
         FROM requests r,
              LATERAL heap_page_items(get_raw_page('requests', (r.ctid::text::point)[0]::int)) p
         WHERE p.lp = (r.ctid::text::point)[1]::int",
    )
    .bind(HEAP_ONLY_TUPLE)
    .fetch_one(pool)
    .await?)
}

/// Entries in B-tree `index`, small enough for its root to be its one leaf
/// (0 when the index is empty: no root yet).
async fn btree_entries(pool: &PgPool, index: &str) -> Result<i64> {
    let (root,): (i64,) = sqlx::query_as("SELECT root::int8 FROM bt_metap($1)")
        .bind(index)
        .fetch_one(pool)
        .await?;
    if root == 0 {
        return Ok(0);
    }
    let (entries,): (i64,) = sqlx::query_as("SELECT count(*) FROM bt_page_items($1, $2)")
        .bind(index)
        .bind(root)
        .fetch_one(pool)
        .await?;
    Ok(entries)
}
