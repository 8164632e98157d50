//! The batched statements: one claim statement and one finish statement for
//! many requests, answering each in order, equal to the single-request path,
//! and never deadlocking against each other.

use std::time::Duration;

use anyhow::Result;
use verimail_worker::store::{
    BatchedStore, Claim, ClaimInput, Finish, FinishInput, Mark, Store, Write,
};

use super::{Db, MINUTE, row};
use crate::support::user;

fn finish<'a>(id: &'a str, sent: bool, release_throttle: bool) -> Finish<'a> {
    Finish {
        id,
        outcome_type: if sent {
            "verimail.verification.sent"
        } else {
            "verimail.verification.failed"
        },
        outcome: br#"{"id":"o"}"#,
        sent_at: sent.then(time::OffsetDateTime::now_utc),
        code_hash: None,
        provider_message_id: None,
        attempted: true,
        release_throttle,
        suppress: None,
    }
}

/// `f` with another outcome (another event id).
fn another(f: Finish<'_>) -> Finish<'_> {
    Finish {
        outcome: br#"{"id":"another"}"#,
        ..f
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_claims_let_exactly_one_request_per_user_through_and_claim_all_others() -> Result<()>
{
    let db = Db::new().await?;
    // Three workers' batchers on one database, all claims at once: batches
    // mix users, and one user's requests meet within and across batches.
    let batches: Vec<BatchedStore> = (0..3)
        .map(|_| {
            BatchedStore::spawn(
                Store::new(db.pool.clone(), Duration::from_secs(60)),
                Default::default(),
            )
        })
        .collect();
    let one = user();
    let mut requests: Vec<(String, String)> = Vec::new();
    for i in 0..60 {
        requests.push((format!("same-{i}"), one.clone()));
        requests.push((format!("other-{i}"), user()));
    }
    let claims = requests
        .iter()
        .enumerate()
        .map(|(i, (id, uid))| batches[i % 3].claim(row(id, uid), MINUTE, true));
    let results = futures_util::future::join_all(claims).await;
    let mut same_passed = 0;
    for ((id, _), claim) in requests.iter().zip(results) {
        match claim? {
            Claim::Claimed(c) if id.starts_with("same-") => {
                same_passed += usize::from(c.throttle_passed)
            }
            Claim::Claimed(c) => assert!(c.throttle_passed, "{id} has a user of its own"),
            other => anyhow::bail!("{id}: unexpected {other:?}"),
        }
    }
    assert_eq!(same_passed, 1);
    // Claimed means leased: a duplicate is busy.
    assert_eq!(
        batches[1]
            .claim(row("other-7", &requests[15].1), MINUTE, true)
            .await?,
        Claim::Busy
    );

    // Conclusions, batched too: each is stored once.
    let finishes = requests
        .iter()
        .enumerate()
        .map(|(i, (id, _))| batches[i % 3].finish(finish(id, id.starts_with("other-"), false)));
    for done in futures_util::future::join_all(finishes).await {
        assert!(done?, "every claimed request concludes");
    }
    assert!(
        !batches[0]
            .finish(another(finish("other-3", true, false)))
            .await?,
        "not twice"
    );
    assert!(
        batches[0].finish(finish("other-3", true, false)).await?,
        "the very same outcome is recognised as stored"
    );
    db.drop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batched_conclusion_without_mail_gives_the_throttle_back() -> Result<()> {
    let db = Db::new().await?;
    let batches = BatchedStore::spawn(
        Store::new(db.pool.clone(), Duration::from_secs(60)),
        Default::default(),
    );
    let (a, b) = (user(), user());
    for (id, uid) in [("a1", &a), ("b1", &b)] {
        assert!(
            matches!(batches.claim(row(id, uid), MINUTE, true).await?, Claim::Claimed(c) if c.throttle_passed)
        );
    }
    let (sent, refused) = futures_util::future::join(
        batches.finish(finish("a1", true, false)),
        batches.finish(finish("b1", false, true)),
    )
    .await;
    assert!(sent? && refused?);
    // a's mail went out: a's next request is throttled; b's did not: b's passes.
    assert!(
        matches!(batches.claim(row("a2", &a), MINUTE, true).await?, Claim::Claimed(c) if !c.throttle_passed)
    );
    assert!(
        matches!(batches.claim(row("b2", &b), MINUTE, true).await?, Claim::Claimed(c) if c.throttle_passed)
    );
    // A finished, published request is done for a duplicate.
    batches.mark_published(&Mark::new("a1", "o")).await?;
    assert!(
        matches!(batches.claim(row("a1", &a), MINUTE, true).await?, Claim::Done(s) if s.published)
    );
    db.drop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_claim_statement_answers_each_request_of_a_batch_in_order() -> Result<()> {
    let db = Db::new().await?;
    let store = Store::new(db.pool.clone(), Duration::from_secs(60));
    let (a, b) = (user(), user());
    // r2 is held (claimed before), r3 is new but its user is in its window.
    store.claim(row("r2", &a), MINUTE).await?;
    store.claim(row("held", &b), MINUTE).await?;
    let inputs = [
        ClaimInput::new(row("r1", &user()), MINUTE),
        ClaimInput::new(row("r2", &a), MINUTE),
        ClaimInput::new(row("r3", &b), MINUTE),
        ClaimInput::new(row("r4", &user()), None),
    ];
    let got = store.claim_batch(&inputs).await?;
    assert_eq!(got.len(), 4);
    assert!(matches!(got[0], Some(c) if c.throttle_passed && c.attempts == 0));
    assert_eq!(got[1], None, "a held request is not claimed again");
    assert!(matches!(got[2], Some(c) if !c.throttle_passed));
    assert!(
        matches!(got[3], Some(c) if c.throttle_passed),
        "no throttle asked"
    );

    let f = |id| Write::Finish(FinishInput::new(&finish(id, true, false)));
    let done = store.finish_batch(&[f("r1"), f("nope"), f("r3")]).await?;
    assert_eq!(done, [true, false, true]);

    // Marks ride in the same statement as other requests' conclusions.
    let mark = |id: &str| Write::MarkPublished(Mark::new(id, "o"));
    let done = store
        .finish_batch(&[mark("r1"), f("r4"), mark("r3")])
        .await?;
    assert_eq!(done, [true, true, true]);
    let published = |id: &'static str| {
        sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM published WHERE request_id = $1 AND outcome_id = 'o')",
        )
        .bind(id)
        .fetch_one(&db.pool)
    };
    assert!(published("r1").await? && published("r3").await?);
    assert!(
        !published("r4").await?,
        "a request just concluded is not published yet"
    );
    db.drop().await;
    Ok(())
}

/// The single-request path is the batch statement with one row: run on the
/// same rows, one request at a time and as one batch, both leave the same
/// answers and the same tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_and_batched_statements_give_the_same_answers_and_rows() -> Result<()> {
    async fn scenario(db: &Db, batched: bool) -> Result<Vec<String>> {
        let store = Store::new(db.pool.clone(), Duration::from_secs(60));
        // The same starting rows: a held request, a done one, an expired
        // lease, a user inside her throttle window.
        store.claim(row("held", "u-held"), MINUTE).await?;
        store.claim(row("done", "u-done"), MINUTE).await?;
        store.finish(finish("done", true, false)).await?;
        store.claim(row("expired", "u-exp"), MINUTE).await?;
        sqlx::query(
            "UPDATE requests SET lease_until = now() - interval '1 second' WHERE id = 'expired'",
        )
        .execute(&db.pool)
        .await?;
        store.claim(row("window", "u-win"), MINUTE).await?;
        store.finish(finish("window", true, false)).await?;
        let rows = [
            ("new", "u-new", MINUTE),
            ("held", "u-held", MINUTE),
            ("done", "u-done", MINUTE),
            ("expired", "u-exp", MINUTE),
            ("window2", "u-win", MINUTE),
            ("free", "u-free", None),
        ];
        let claims: Vec<Option<(bool, i32)>> = if batched {
            let inputs: Vec<ClaimInput> = rows
                .iter()
                .map(|(id, uid, t)| ClaimInput::new(row(id, uid), *t))
                .collect();
            store
                .claim_batch(&inputs)
                .await?
                .into_iter()
                .map(|c| c.map(|c| (c.throttle_passed, c.attempts)))
                .collect()
        } else {
            let mut out = Vec::new();
            for (id, uid, t) in rows {
                out.push(match store.claim(row(id, uid), t).await? {
                    Claim::Claimed(c) => Some((c.throttle_passed, c.attempts)),
                    _ => None,
                });
            }
            out
        };
        let conclusions = [
            ("new", true, false),
            ("expired", false, true),
            ("window2", false, true),
            ("free", true, false),
            ("done", true, false),
        ];
        // "done" concludes with another outcome than the stored one.
        let finish = |id, sent, release| {
            let f = finish(id, sent, release);
            if id == "done" { another(f) } else { f }
        };
        let finished: Vec<bool> = if batched {
            let mut jobs: Vec<Write> = conclusions
                .iter()
                .map(|(id, sent, release)| {
                    Write::Finish(FinishInput::new(&finish(id, *sent, *release)))
                })
                .collect();
            jobs.push(Write::MarkPublished(Mark::new("window", "o")));
            let mut done = store.finish_batch(&jobs).await?;
            done.pop();
            done
        } else {
            let mut out = Vec::new();
            for (id, sent, release) in conclusions {
                out.push(store.finish(finish(id, sent, release)).await?);
            }
            store.mark_published(&Mark::new("window", "o")).await?;
            out
        };
        let requests: Vec<(String, String, bool, bool, i32, bool)> = sqlx::query_as(
            "SELECT id, state, throttle_passed,
                    EXISTS (SELECT 1 FROM published p WHERE p.request_id = r.id), attempts,
                    lease_until IS NOT NULL FROM requests r ORDER BY id",
        )
        .fetch_all(&db.pool)
        .await?;
        let throttle: Vec<(String, String)> =
            sqlx::query_as("SELECT user_id, request_id FROM throttle ORDER BY user_id")
                .fetch_all(&db.pool)
                .await?;
        Ok(vec![
            format!("{claims:?}"),
            format!("{finished:?}"),
            format!("{requests:?}"),
            format!("{throttle:?}"),
        ])
    }
    let (one, many) = (Db::new().await?, Db::new().await?);
    let single = scenario(&one, false).await?;
    let batched = scenario(&many, true).await?;
    assert_eq!(single, batched);
    // And what both say is right.
    assert_eq!(
        single[0],
        "[Some((true, 0)), None, None, Some((true, 0)), Some((false, 0)), Some((true, 0))]"
    );
    assert_eq!(single[1], "[true, true, true, true, false]");
    one.drop().await;
    many.drop().await;
    Ok(())
}

/// Waits until `n` sessions of `db` wait for a lock (at most 10 s).
async fn lock_waiters(db: &Db, n: i64) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let waiters: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&db.pool)
        .await?;
        if waiters >= n {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{waiters} waiting, not {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A claim batch and a finish batch of two workers touching the same request
/// and throttle row, made to meet: each waits for the other's lock in turn
/// unless both lock in one order (requests first, then throttle).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_batch_and_a_finish_batch_on_common_rows_never_deadlock() -> Result<()> {
    let db = Db::new().await?;
    let store = Store::new(db.pool.clone(), Duration::from_secs(60));
    let uid = user();
    // x is held (live lease) and holds uid's throttle slot.
    store.claim(row("x", &uid), MINUTE).await?;
    // A test transaction holds x, so the finish queues for it first, then the claim.
    let mut hold = db.pool.begin().await?;
    sqlx::query("SELECT 1 FROM requests WHERE id = 'x' FOR UPDATE")
        .execute(&mut *hold)
        .await?;
    let finishing = {
        let store = store.clone();
        tokio::spawn(async move {
            let f = Write::Finish(FinishInput::new(&finish("x", false, true)));
            store.finish_batch(&[f]).await
        })
    };
    lock_waiters(&db, 1).await?;
    let claiming = {
        let (store, uid) = (store.clone(), uid.clone());
        tokio::spawn(async move {
            let inputs = [
                ClaimInput::new(row("x", &uid), MINUTE),
                ClaimInput::new(row("y", &uid), MINUTE),
            ];
            store.claim_batch(&inputs).await
        })
    };
    lock_waiters(&db, 2).await?;
    hold.rollback().await?;
    let finished = finishing.await??;
    let claimed = claiming.await??;
    assert_eq!(finished, [true]);
    assert_eq!(claimed[0], None, "x is done");
    assert!(
        matches!(claimed[1], Some(c) if c.throttle_passed),
        "x gave the throttle back, so y passes: {claimed:?}"
    );
    db.drop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_batch_answers_each_suppressed_address_with_its_reason_and_no_other() -> Result<()>
{
    let db = Db::new().await?;
    let store = Store::new(db.pool.clone(), Duration::from_secs(60));
    sqlx::query(
        "INSERT INTO suppressions (email, reason, source)
         VALUES ('Listed@Example.com', 'complaint', 'ses'), ('bounced@example.com', 'bounce', 'ses')",
    )
    .execute(&db.pool)
    .await?;
    let with = |id: &str, email: &str| {
        let user = user();
        let mut r = row(id, &user);
        r.email = Some(email);
        ClaimInput::new(r, MINUTE)
    };
    let inputs = [
        with("s1", "clean-1@example.com"),
        with("s2", "listed@example.com"),
        with("s3", "clean-2@example.com"),
        with("s4", "BOUNCED@example.com"),
    ];
    let got = store.claim_batch(&inputs).await?;
    let reasons: Vec<Option<String>> = got
        .iter()
        .map(|c| c.as_ref().and_then(|c| c.suppressed.map(|r| r.to_string())))
        .collect();
    assert_eq!(
        reasons,
        [None, Some("complaint".into()), None, Some("bounce".into())],
        "each address's own entry, found case-insensitively, and none for the others"
    );
    let passed: Vec<bool> = got
        .iter()
        .map(|c| c.as_ref().is_some_and(|c| c.throttle_passed))
        .collect();
    assert_eq!(
        passed,
        [true, false, true, false],
        "a suppressed request takes no throttle slot"
    );
    db.drop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_single_statement_recognises_an_outcome_already_stored_with_its_bytes()
-> Result<()> {
    let db = Db::new().await?;
    let store = Store::new(db.pool.clone(), Duration::from_secs(60));
    let uid = user();
    assert!(matches!(
        store.claim(row("r1", &uid), MINUTE).await?,
        Claim::Claimed(_)
    ));
    assert!(store.finish(finish("r1", true, false)).await?);
    let f = || Write::Finish(FinishInput::new(&finish("r1", true, false)));
    assert_eq!(
        store.finish_batch(&[f()]).await?,
        [false],
        "a batch concludes nothing here, and says so"
    );
    assert!(
        store.finish(finish("r1", true, false)).await?,
        "the single statement looks back and finds these very bytes"
    );
    assert!(
        !store.finish(another(finish("r1", true, false))).await?,
        "another outcome is not taken for this one"
    );
    let batched = BatchedStore::spawn(store, Default::default());
    assert!(
        batched.finish(finish("r1", true, false)).await?,
        "the batched path asks the single statement when its batch concluded nothing"
    );
    db.drop().await;
    Ok(())
}

/// A round: the conclusions, marks and claims that queued up together are
/// committed by one transaction (one commit, one WAL flush), conclusions
/// first, so a throttle a failed send gave back is free for a claim of the
/// same round.
#[tokio::test]
async fn a_round_commits_its_conclusions_marks_and_claims_in_one_transaction() -> Result<()> {
    let db = Db::new().await?;
    let batches = BatchedStore::spawn(
        Store::new(db.pool.clone(), Duration::from_secs(60)),
        Default::default(),
    );
    let (a, b, c) = (user(), user(), user());
    for (id, uid) in [("a1", &a), ("b1", &b), ("c1", &c)] {
        assert!(
            matches!(batches.claim(row(id, uid), MINUTE, true).await?, Claim::Claimed(c) if c.throttle_passed)
        );
    }
    // c1's outcome was stored before; its mark comes with the round (a
    // request's conclusion and mark never share one: the mark follows the
    // publish, which follows the conclusion).
    assert!(batches.finish(finish("c1", true, false)).await?);
    // On this single-threaded runtime all four calls are queued before the
    // batching task runs again: one round takes them.
    let mark = Mark::new("c1", "o");
    let (sent, refused, marked, next) = tokio::join!(
        batches.finish(finish("a1", true, false)),
        batches.finish(finish("b1", false, true)),
        batches.mark_published(&mark),
        batches.claim(row("b2", &b), MINUTE, true),
    );
    assert!(sent? && refused?);
    marked?;
    assert!(
        matches!(next?, Claim::Claimed(c) if c.throttle_passed),
        "b1 sent nothing and gave its throttle back within the round"
    );
    let xmin = |sql: &'static str, id: &'static str| {
        sqlx::query_scalar::<_, String>(sql)
            .bind(id)
            .fetch_one(&db.pool)
    };
    let request = "SELECT xmin::text FROM requests WHERE id = $1";
    let writers = [
        xmin(request, "a1").await?,
        xmin(request, "b1").await?,
        xmin(request, "b2").await?,
        xmin(
            "SELECT xmin::text FROM published WHERE request_id = $1",
            "c1",
        )
        .await?,
    ];
    assert!(
        writers.iter().all(|x| *x == writers[0]),
        "one transaction wrote the round's rows: {writers:?}"
    );
    db.drop().await;
    Ok(())
}

/// Two workers' rounds, each concluding a request and claiming a duplicate
/// of the one the other concludes, made to meet: each round holds its
/// conclusion's row while its claim waits for the other's, a cycle.
/// PostgreSQL fails one round; its callers run alone, and every answer is
/// still right: both requests concluded once, both duplicates busy.
#[tokio::test]
async fn crossing_rounds_of_two_workers_deadlock_once_and_every_caller_is_answered() -> Result<()> {
    let db = Db::new().await?;
    let (a, b) = (user(), user());
    let spawn = || {
        BatchedStore::spawn(
            Store::new(db.pool.clone(), Duration::from_secs(60)),
            Default::default(),
        )
    };
    let (one, two) = (spawn(), spawn());
    assert!(matches!(
        one.claim(row("a1", &a), MINUTE, true).await?,
        Claim::Claimed(_)
    ));
    assert!(matches!(
        two.claim(row("b1", &b), MINUTE, true).await?,
        Claim::Claimed(_)
    ));
    let deadlocks = async || -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(&db.pool)
        .await?)
    };
    let before = deadlocks().await?;
    // A test transaction holds both rows, so each round's conclusion queues
    // for its row first and takes it first when they are let go.
    let mut hold = db.pool.begin().await?;
    sqlx::query("SELECT 1 FROM requests WHERE id IN ('a1', 'b1') FOR UPDATE")
        .execute(&mut *hold)
        .await?;
    let rounds = {
        let (one, two, a, b) = (one.clone(), two.clone(), a.clone(), b.clone());
        // On this single-threaded runtime the four calls are queued before
        // either batching task runs: each worker's two go in one round.
        tokio::spawn(async move {
            let (fa, cb, fb, ca) = tokio::join!(
                one.finish(finish("a1", true, false)),
                one.claim(row("b1", &b), MINUTE, true),
                two.finish(finish("b1", true, false)),
                two.claim(row("a1", &a), MINUTE, true),
            );
            Ok::<_, sqlx::Error>((fa?, cb?, fb?, ca?))
        })
    };
    lock_waiters(&db, 2).await?;
    hold.rollback().await?;
    let (fa, cb, fb, ca) = rounds.await??;
    assert!(fa && fb, "both requests concluded");
    assert_eq!(cb, Claim::Busy, "b1's duplicate is not claimed");
    assert_eq!(ca, Claim::Busy, "a1's duplicate is not claimed");
    let done: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM requests WHERE id IN ('a1', 'b1') AND state = 'done' AND attempts = 1",
    )
    .fetch_one(&db.pool)
    .await?;
    assert_eq!(done, 2, "each concluded once");
    // The statistics reach pg_stat_database within about a second.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while deadlocks().await? == before {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the rounds met without a deadlock: the test no longer makes the cycle it describes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    db.drop().await;
    Ok(())
}
