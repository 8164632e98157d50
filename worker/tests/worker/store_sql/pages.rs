//! Where the conclusion writes: on the row's own page, with no new index
//! entry (a heap-only, "HOT", update). A conclusion that moved the row would
//! add an entry to every index of `requests`, about a fifth of PostgreSQL's
//! work per mail (docs/performance.md). Read off the pages themselves with
//! `pageinspect`, which ships with PostgreSQL.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
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
    // batched conclusions with an outcome of a real one's size and a code.
    // (Five rows and their concluded versions fit one page whatever the
    // batching; a page's worth of claims concluded in one transaction finds
    // room for about four in five: docs/performance.md.)
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
        .map(|((id, uid), email)| {
            let (batches, outcome, context) = (&batches, &outcome, context);
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
                        provider_message_id: None,
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
    // Every live version of the five rows was written by a HOT update.
    let (live, heap_only): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE (p.t_infomask2 & $1) <> 0)
         FROM requests r,
              LATERAL heap_page_items(get_raw_page('requests', (r.ctid::text::point)[0]::int)) p
         WHERE p.t_ctid = r.ctid AND p.lp = (r.ctid::text::point)[1]::int",
    )
    .bind(HEAP_ONLY_TUPLE)
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(live, 5);
    assert_eq!(heap_only, 5, "every conclusion stayed on its row's page");

    // And each B-tree of `requests` holds one entry per request (a moved row
    // would have left two), or none where the index skips such rows.
    let indexes: Vec<(String, bool)> = sqlx::query_as(
        "SELECT c.relname, i.indpred IS NOT NULL
         FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
         JOIN pg_am a ON a.oid = c.relam
         WHERE i.indrelid = 'requests'::regclass AND a.amname = 'btree'",
    )
    .fetch_all(&db.pool)
    .await?;
    assert!(indexes.len() >= 4, "{indexes:?}");
    for (index, partial) in indexes {
        let (root,): (i64,) = sqlx::query_as("SELECT root::int8 FROM bt_metap($1)")
            .bind(&index)
            .fetch_one(&db.pool)
            .await?;
        // Five short keys fit the root page, a leaf (0: the index is empty).
        let (entries,): (i64,) = if root == 0 {
            (0,)
        } else {
            sqlx::query_as("SELECT count(*) FROM bt_page_items($1, $2)")
                .bind(&index)
                .bind(root)
                .fetch_one(&db.pool)
                .await?
        };
        let expected = if partial { 0 } else { 5 };
        assert_eq!(entries, expected, "entries in {index}");
    }
    db.drop().await;
    Ok(())
}
