//! `verimail-bench store`: PostgreSQL's CPU per request for the worker's own
//! statements alone: claims, conclusions and published marks through the
//! worker's `BatchedStore`, from many concurrent tasks as deliveries make
//! them, with no broker, no SMTP and no worker process. What one request
//! costs the database, without the run-to-run noise of the whole pipeline
//! sharing two cores (still ±10-15 % between identical runs: compare builds
//! in interleaved runs).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use time::OffsetDateTime;
use verimail_worker::health::Health;
use verimail_worker::store::{BatchedStore, Claim, Finish, Mark, RequestRow, Store};

use crate::results::Results;
use crate::system::{Server, ServerCpu, prepare_db, print_means, rate};
use verimail_tests::env::TestEnv;

/// About the size of a real `sent` outcome event.
const OUTCOME_BYTES: usize = 460;

/// Runs `n` requests, `concurrency` at a time: each claimed (with a 60 s
/// throttle on its own user), concluded `sent` with a code hash, and marked
/// published, as the worker does for a mail.
pub(crate) async fn store(out: &Results, n: usize, concurrency: usize) -> Result<()> {
    println!("== the worker's statements alone: {n} requests, {concurrency} at a time");
    let env = TestEnv::new("store");
    let result = run(&env, out, n, concurrency).await;
    env.cleanup().await;
    result
}

async fn run(env: &TestEnv, out: &Results, n: usize, concurrency: usize) -> Result<()> {
    let url = env.get("DATABASE_URL").context("DATABASE_URL")?;
    prepare_db(env).await?;
    let pool = verimail_shared::db::connect(url, false, Default::default()).await?;
    // The worker's recorder, so the batches' sizes and times are counted
    // (printed after the run).
    let metrics = verimail_worker::metrics::handle();
    let store = Store::new(pool, Duration::from_secs(60));
    let batches = BatchedStore::spawn(store, Arc::new(Health::default()));
    let prefix = uuid::Uuid::now_v7().simple().to_string();
    let outcome = vec![b'x'; OUTCOME_BYTES];

    let servers0 = ServerCpu::snapshot(&env.database);
    let t0 = Instant::now();
    let mut failures = 0usize;
    let mut first_error = None;
    let mut runs = futures_util::stream::iter(0..n)
        .map(|i| {
            let (batches, prefix, outcome) = (&batches, &prefix, &outcome);
            async move { one(batches, prefix, i, outcome).await }
        })
        .buffer_unordered(concurrency);
    while let Some(done) = runs.next().await {
        if let Err(e) = done {
            failures += 1;
            first_error.get_or_insert(e);
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let servers1 = ServerCpu::snapshot(&env.database);
    drop(runs);
    if failures > 0 {
        bail!("store: {failures} of {n} requests failed; the first: {first_error:?}");
    }
    let pg_ms = servers0.ms_since(&servers1, &[Server::PostgresBackends]);
    let per = pg_ms / n as f64;
    println!(
        "  {n} requests in {secs:.2} s ({:.0}/s); PostgreSQL CPU per request: {per:.4} ms in this database's backends",
        rate(n, secs)
    );
    print_means(
        "the worker's statements",
        "its metrics recorder",
        &metrics.render(),
    );
    out.put("store_pg_ms_per_request", format!("{per:.4}"))?;
    out.put("store_per_s", format!("{:.0}", rate(n, secs)))?;
    Ok(())
}

/// One request's three statements, as a delivery makes them.
async fn one(batches: &BatchedStore, prefix: &str, i: usize, outcome: &[u8]) -> Result<()> {
    let id = format!("{prefix}-{i}");
    let user = format!("u-{prefix}-{i}");
    let email = format!("{user}@example.com");
    let row = RequestRow {
        id: &id,
        user_id: Some(&user),
        email: Some(&email),
        purpose: Some("verify_email"),
        locale: None,
        return_url: None,
        context: None,
    };
    match batches
        .claim(row, Some(Duration::from_secs(60)), false)
        .await?
    {
        Claim::Claimed(c) if c.throttle_passed => {}
        other => bail!("request {id} not claimed: {other:?}"),
    }
    let finished = batches
        .finish(Finish {
            id: &id,
            outcome_type: "verimail.verification.sent",
            outcome,
            sent_at: Some(OffsetDateTime::now_utc()),
            code_hash: Some(&[7; 32]),
            provider_message_id: None,
            attempted: true,
            release_throttle: false,
            suppress: None,
        })
        .await?;
    if !finished {
        bail!("request {id} not concluded");
    }
    batches.mark_published(&Mark::new(&id, &id)).await?;
    Ok(())
}
