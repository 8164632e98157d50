//! The claim and throttle statements on their own, against a real database:
//! here the single-request path, in [`batched`] the statements for many.

mod batched;
mod pages;

use std::time::Duration;

use anyhow::Result;
use verimail_worker::store::{Claim, Finish, Mark, RequestRow, Store};

use crate::support::{PG, user};

struct Db {
    name: String,
    pool: sqlx::PgPool,
}

impl Db {
    async fn new() -> Result<Self> {
        let name = format!("verimail_s_{}", uuid::Uuid::new_v4().simple());
        let pool = verimail_shared::db::connect(
            &format!("{PG}/{name}"),
            true,
            verimail_shared::db::PoolSettings {
                max_connections: 20,
                acquire_timeout: Duration::from_secs(10),
            },
        )
        .await?;
        Ok(Self { name, pool })
    }

    async fn drop(self) {
        self.pool.close().await;
        if let Ok(admin) = sqlx::PgPool::connect(&format!("{PG}/postgres")).await {
            let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
            let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&admin).await;
            admin.close().await;
        }
    }
}

fn row<'a>(id: &'a str, user_id: &'a str) -> RequestRow<'a> {
    RequestRow {
        id,
        user_id: Some(user_id),
        email: Some("a@example.com"),
        purpose: Some("verify_email"),
        locale: None,
        return_url: None,
        context: None,
    }
}

const MINUTE: Option<Duration> = Some(Duration::from_secs(60));

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_throttle_lets_exactly_one_of_many_concurrent_requests_through() -> Result<()> {
    let db = Db::new().await?;
    // Several stores (as several worker processes would have) on one database.
    let stores: Vec<Store> = (0..3)
        .map(|_| Store::new(db.pool.clone(), Duration::from_secs(60)))
        .collect();
    let uid = user();
    let ids: Vec<String> = (0..100).map(|i| format!("req-{i}")).collect();
    let claims = ids
        .iter()
        .enumerate()
        .map(|(i, id)| stores[i % 3].claim(row(id, &uid), MINUTE));
    let mut passed = 0;
    for claim in futures_util::future::join_all(claims).await {
        match claim? {
            Claim::Claimed(c) if c.throttle_passed => passed += 1,
            Claim::Claimed(_) => {}
            other => anyhow::bail!("unexpected {other:?}"),
        }
    }
    assert_eq!(passed, 1);
    // Another purpose, or another user, is not affected.
    let mut other = row("other-purpose", &uid);
    other.purpose = Some("reset_password");
    assert!(
        matches!(stores[0].claim(other, MINUTE).await?, Claim::Claimed(c) if c.throttle_passed)
    );
    db.drop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_is_busy_while_leased_and_done_after_finishing() -> Result<()> {
    let db = Db::new().await?;
    let store = Store::new(db.pool.clone(), Duration::from_secs(60));
    let uid = user();
    let first = store.claim(row("r1", &uid), MINUTE).await?;
    assert!(matches!(first, Claim::Claimed(c) if c.throttle_passed && c.attempts == 0));
    // A concurrent duplicate: the lease is live.
    assert_eq!(store.claim(row("r1", &uid), MINUTE).await?, Claim::Busy);
    // Released for a retry, it is claimable again and keeps its throttle pass.
    store.release_for_retry("r1").await?;
    let again = store.claim(row("r1", &uid), MINUTE).await?;
    assert!(matches!(again, Claim::Claimed(c) if c.throttle_passed && c.attempts == 1));
    let done = store
        .finish(Finish {
            id: "r1",
            outcome_type: "verimail.verification.sent",
            outcome: br#"{"id":"o1"}"#,
            sent_at: Some(time::OffsetDateTime::now_utc()),
            code_hash: Some(&[7; 32]),
            provider_message_id: None,
            attempted: true,
            release_throttle: false,
            suppress: None,
        })
        .await?;
    assert!(done);
    // The mail's code is stored as its hash, with no wrong tries yet.
    let (hash, tries): (Option<Vec<u8>>, i32) =
        sqlx::query_as("SELECT code_hash, code_attempts FROM requests WHERE id = 'r1'")
            .fetch_one(&db.pool)
            .await?;
    assert_eq!(hash.as_deref(), Some(&[7u8; 32][..]));
    assert_eq!(tries, 0);
    // Concluded but not yet confirmed: the concluding delivery is publishing.
    assert_eq!(store.claim(row("r1", &uid), MINUTE).await?, Claim::Busy);
    // A mark of another outcome of r1 (one a replay replaced) is not this one's.
    store.mark_published(&Mark::new("r1", "o0")).await?;
    assert_eq!(store.claim(row("r1", &uid), MINUTE).await?, Claim::Busy);
    store.mark_published(&Mark::new("r1", "o1")).await?;
    assert!(matches!(store.claim(row("r1", &uid), MINUTE).await?, Claim::Done(s) if s.published));
    // A second request for the user is throttled; a duplicate of the old one
    // does not touch the throttle.
    let r2 = store.claim(row("r2", &uid), MINUTE).await?;
    assert!(matches!(r2, Claim::Claimed(c) if !c.throttle_passed));
    let remaining = store
        .throttle_remaining(&uid, "verify_email", Duration::from_secs(60))
        .await?;
    assert!(
        remaining.is_some_and(|r| r > 55.0 && r <= 60.0),
        "{remaining:?}"
    );
    db.drop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_is_taken_over_and_a_failed_request_gives_the_throttle_back() -> Result<()>
{
    let db = Db::new().await?;
    let store = Store::new(db.pool.clone(), Duration::from_millis(200));
    let uid = user();
    assert!(matches!(
        store.claim(row("r1", &uid), MINUTE).await?,
        Claim::Claimed(_)
    ));
    tokio::time::sleep(Duration::from_millis(400)).await;
    // The holder "crashed": the redelivery takes over without being throttled by itself.
    assert!(
        matches!(store.claim(row("r1", &uid), MINUTE).await?, Claim::Claimed(c) if c.throttle_passed)
    );
    store
        .finish(Finish {
            id: "r1",
            outcome_type: "verimail.verification.failed",
            outcome: br#"{"id":"o1"}"#,
            sent_at: None,
            code_hash: None,
            provider_message_id: None,
            attempted: true,
            release_throttle: true,
            suppress: None,
        })
        .await?;
    // The concluding delivery died before publishing: once its lease ran
    // out, one duplicate (not two) gets the stored outcome to publish.
    tokio::time::sleep(Duration::from_millis(400)).await;
    match store.claim(row("r1", &uid), MINUTE).await? {
        Claim::Done(stored) => {
            assert!(!stored.published);
            assert_eq!(stored.outcome.as_deref(), Some(&br#"{"id":"o1"}"#[..]));
        }
        other => anyhow::bail!("unexpected {other:?}"),
    }
    assert_eq!(store.claim(row("r1", &uid), MINUTE).await?, Claim::Busy);
    store.mark_published(&Mark::new("r1", "o1")).await?;
    // No mail went out: the next request passes.
    assert!(
        matches!(store.claim(row("r2", &uid), MINUTE).await?, Claim::Claimed(c) if c.throttle_passed)
    );
    // The replay rule: only the stored failed outcome's id reopens it.
    assert!(store.reopen("r1", "other").await?.is_none());
    let reopened = store.reopen("r1", "o1").await?;
    assert!(matches!(reopened, Some(c) if c.attempts == 0));
    db.drop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_marked_by_an_earlier_release_counts_as_published() -> Result<()> {
    // During a rolling upgrade an older worker marks `requests.outcome_published`
    // instead of writing a `published` row: a duplicate must still find it done
    // and published (not re-publish it), and a row marked neither way must not.
    let db = Db::new().await?;
    let store = Store::new(db.pool.clone(), Duration::from_millis(100));
    sqlx::query(
        "INSERT INTO requests (id, state, outcome_type, outcome, outcome_published, lease_until)
         VALUES ('old', 'done', 'verimail.verification.sent', '{\"id\":\"o-old\"}', true, NULL),
                ('new', 'done', 'verimail.verification.sent', '{\"id\":\"o-new\"}', false, NULL)",
    )
    .execute(&db.pool)
    .await?;
    assert!(
        matches!(store.claim(row("old", &user()), MINUTE).await?, Claim::Done(s) if s.published)
    );
    assert!(
        matches!(store.claim(row("new", &user()), MINUTE).await?, Claim::Done(s) if !s.published),
        "an unmarked outcome is handed over to re-publish"
    );
    db.drop().await;
    Ok(())
}
