//! Keeps `vendor/sqlx-core` honest: sqlx 0.9.0 stopped setting `TCP_NODELAY`
//! on PostgreSQL TCP connections (transact-rs/sqlx#4335), and a statement
//! that leaves the client in two TCP segments then waits for the server's
//! delayed ACK, about 40 ms on Linux. The patch in `vendor/sqlx-core` (see
//! vendor/README.md) puts the option back. If the patch is lost (a `cargo
//! update` past the `[patch]`, a new sqlx without the fix), this test fails.
//!
//! Which statements stall: measured on loopback without the patch, a
//! statement of 16 KiB or more (the size of the services' batched statements
//! with a few dozen rows) nearly always took 40-50 ms, one of 8 KiB or less
//! never did: the first `send` fills the socket's initial send buffer, and
//! Nagle holds the rest until PostgreSQL's delayed ACK. So half of the 200
//! statements here carry a 24 KiB parameter, and the other half are the tiny
//! statements around them (a `SELECT`, a transaction). Without the patch
//! nearly all the batch-sized ones stall, so the p99 is ~45 ms; with it, a few
//! milliseconds. A round over the limit is run again (at most [`ROUNDS`] in
//! all) so that a busy machine's scheduling hiccup does not fail the test,
//! while a lost patch fails every round.
//!
//! It talks to the real PostgreSQL over TCP (127.0.0.1:5432, user `postgres`,
//! trust authentication, as the other database tests), never the Unix socket,
//! which never had the problem. `VERIMAIL_TEST_PG_TCP` overrides the URL.
//! Needs the `db` feature (on by default).

#![cfg(feature = "db")]

use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};

/// Sequential statements timed per round.
const STATEMENTS: usize = 200;
/// The stall is ~40 ms (Linux's minimum delayed ACK); a healthy statement on
/// loopback takes well under a millisecond, a few on a busy machine.
const P99_LIMIT: Duration = Duration::from_millis(20);
/// Rounds before the test gives up.
const ROUNDS: usize = 3;
/// The statements, in turn: tiny ones and batch-sized ones.
const KINDS: [&str; 4] = [
    "SELECT $1 + 1",
    "INSERT of 24 KiB",
    "transaction (BEGIN, UPDATE, COMMIT)",
    "SELECT of 24 KiB",
];

fn url() -> String {
    std::env::var("VERIMAIL_TEST_PG_TCP")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Runs [`STATEMENTS`] statements one after another; each one's time, by kind.
async fn round(conn: &mut PgConnection) -> [Vec<Duration>; 4] {
    let batch_sized = "x".repeat(24 * 1024);
    let mut by_kind: [Vec<Duration>; 4] = Default::default();
    for i in 0..STATEMENTS as i32 {
        let kind = (i % 4) as usize;
        let started = Instant::now();
        match kind {
            0 => {
                let n: i32 = sqlx::query_scalar("SELECT $1::int + 1")
                    .bind(i)
                    .fetch_one(&mut *conn)
                    .await
                    .expect("select");
                assert_eq!(n, i + 1);
            }
            1 => {
                sqlx::query(
                    "INSERT INTO nodelay_probe (id, body) VALUES ($1, $2) \
                     ON CONFLICT (id) DO UPDATE SET body = excluded.body",
                )
                .bind(i)
                .bind(&batch_sized)
                .execute(&mut *conn)
                .await
                .expect("batch-sized insert");
            }
            2 => {
                let mut tx = conn.begin().await.expect("begin");
                sqlx::query("UPDATE nodelay_probe SET body = $2 WHERE id = $1")
                    .bind(i - 1)
                    .bind("updated")
                    .execute(&mut *tx)
                    .await
                    .expect("update");
                tx.commit().await.expect("commit");
            }
            _ => {
                let len: i32 = sqlx::query_scalar("SELECT length($1::text)")
                    .bind(&batch_sized)
                    .fetch_one(&mut *conn)
                    .await
                    .expect("batch-sized select");
                assert_eq!(len as usize, batch_sized.len());
            }
        }
        by_kind[kind].push(started.elapsed());
    }
    by_kind
}

#[tokio::test]
async fn sequential_statements_over_tcp_do_not_wait_for_delayed_acks() {
    let url = url();
    assert!(
        url.contains("@127.0.0.1") || url.contains("@localhost") || url.contains("@["),
        "the test must use TCP, not the Unix socket: {url}"
    );
    let mut conn = PgConnection::connect(&url)
        .await
        .expect("PostgreSQL over TCP at 127.0.0.1:5432");
    sqlx::raw_sql("CREATE TEMPORARY TABLE nodelay_probe (id int PRIMARY KEY, body text NOT NULL)")
        .execute(&mut conn)
        .await
        .expect("temporary table");

    let mut p99s = Vec::new();
    for attempt in 1..=ROUNDS {
        let by_kind = round(&mut conn).await;
        let mut all: Vec<Duration> = by_kind.iter().flatten().copied().collect();
        all.sort_unstable();
        let p99 = percentile(&all, 0.99);
        let stalled = all
            .iter()
            .filter(|d| **d >= Duration::from_millis(35))
            .count();
        println!(
            "sqlx over TCP, round {attempt}: {STATEMENTS} sequential statements, p50 {:?}, \
             p99 {p99:?}, max {:?}, {stalled} at 35 ms or more (limit: p99 < {P99_LIMIT:?})",
            percentile(&all, 0.50),
            all[all.len() - 1],
        );
        for (kind, mut times) in KINDS.into_iter().zip(by_kind) {
            times.sort_unstable();
            println!(
                "  {kind}: p50 {:?}, max {:?}",
                percentile(&times, 0.50),
                times[times.len() - 1]
            );
        }
        p99s.push(p99);
        if p99 < P99_LIMIT {
            break;
        }
    }
    let _ = conn.close().await;
    assert!(
        p99s.iter().any(|p99| *p99 < P99_LIMIT),
        "p99 {p99s:?} ≥ {P99_LIMIT:?} in every round: the delayed-ACK stall is back; is \
         vendor/sqlx-core's TCP_NODELAY patch still applied (vendor/README.md)?"
    );
}
