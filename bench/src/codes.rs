//! `verimail-bench codes`: `POST /v1/codes/verify` per second under wrk with
//! right, fresh codes (each used once), measured like `/confirm` first clicks.
//!
//! The rows are what the worker leaves behind a sent mail (a request with its
//! code's keyed hash), written straight into the database so the timed part is
//! the gateway alone.

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use verimail_shared::token::{Code, Signer};
use verimail_tests::env::TestEnv;

use crate::broker::*;
use crate::gateway::{ready_gateway, verified_tap};
use crate::http_load::*;
use crate::results::*;
use crate::system::*;

/// The API key wrk sends (the lua script reads it from its arguments' file).
const API_KEY: &str = "bench-api-key-0123456789";

/// Rows written per INSERT.
const CHUNK: usize = 5_000;

pub(crate) async fn codes(out: &Results, n: usize, lua: &Path, wrk: &WrkArgs) -> Result<()> {
    let mut env = TestEnv::new("bcode");
    env.set("CONFIRM_RATE_LIMIT_PER_MINUTE", "100000000");
    env.set("GATEWAY_API_KEYS", API_KEY);
    env.set("LOG_FORMAT", "json");
    env.set("RUST_LOG", "warn");
    let file = std::env::temp_dir().join(format!("{}-codes.txt", env.namespace));
    let result = codes_in(&env, out, n, lua, wrk, &file).await;
    let _ = std::fs::remove_file(&file);
    env.cleanup().await;
    result
}

/// Writes `n` sent requests with codes; the file gets `user_id code` lines.
async fn seed(env: &TestEnv, n: usize, file: &Path) -> Result<f64> {
    let config = env.config();
    let signer = Signer::new(&config.keys()?, config.itsdangerous_digest);
    let url = env.get("DATABASE_URL").context("DATABASE_URL")?;
    let pool = sqlx::PgPool::connect(url).await?;
    let started = Instant::now();
    let mut w = std::io::BufWriter::new(std::fs::File::create(file)?);
    let prefix = unique_prefix();
    for start in (0..n).step_by(CHUNK) {
        let (mut ids, mut users, mut emails, mut hashes) = (vec![], vec![], vec![], vec![]);
        for i in start..(start + CHUNK).min(n) {
            let id = uuid::Uuid::now_v7().to_string();
            let user = format!("{prefix}-{i}");
            let code = Code::generate(config.code_length);
            hashes.push(signer.code_hash(&id, code.digits()));
            writeln!(w, "{user} {}", code.digits())?;
            emails.push(format!("{user}@example.com"));
            ids.push(id);
            users.push(user);
        }
        sqlx::query(
            "INSERT INTO requests (id, user_id, email, purpose, state, sent_at, code_hash) \
             SELECT id, u, e, 'verify_email', 'done', now(), h \
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bytea[]) AS t(id, u, e, h)",
        )
        .bind(&ids)
        .bind(&users)
        .bind(&emails)
        .bind(&hashes)
        .execute(&pool)
        .await?;
    }
    w.flush()?;
    pool.close().await;
    Ok(started.elapsed().as_secs_f64())
}

async fn codes_in(
    env: &TestEnv,
    out: &Results,
    n: usize,
    lua: &Path,
    wrk: &WrkArgs,
    file: &Path,
) -> Result<()> {
    let (conn, tap) = verified_tap(env).await?;
    let secs = seed(env, n, file).await?;
    println!("  wrote {n} sent requests with codes in {secs:.2} s");

    let gw = ready_gateway(env).await?;
    let base = env.gateway_url();
    let pid = gw.pid().unwrap_or(0);
    let cpu0 = cpu_ticks(pid).unwrap_or(0);
    let load = run_wrk(&base, file, lua, wrk, "once").await;
    let cpu_ms = cpu_ticks(pid).unwrap_or(0).saturating_sub(cpu0) as f64 * tick_ms();
    let rss = status_kib(pid, "VmRSS").unwrap_or(0);
    let load = match load {
        Ok(load) => load,
        Err(e) => {
            gw.stop(Duration::from_secs(10)).await;
            return Err(e);
        }
    };
    let requests = load.requests.max(1) as f64;
    println!(
        "  gateway: VmRSS {} after the load; CPU {cpu_ms:.0} ms, {:.3} ms per verification",
        mib(rss),
        cpu_ms / requests
    );
    let expected = usize::try_from(load.ok).unwrap_or(0);
    let relayed = tap.wait(expected, Duration::from_secs(10)).await;
    println!(
        "  verified events relayed: {relayed} distinct of {expected} verifications ({})",
        tap.breakdown()
    );
    gw.stop(Duration::from_secs(15)).await;
    load.record(out, "codes")?;
    out.put("codes_rss_kib", rss)?;
    out.put("codes_events", relayed)?;
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}
