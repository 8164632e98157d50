//! `verimail-bench gateway` (confirms per second under wrk with fresh `v1` tokens)
//! and the tokens it, and `mint-tokens`, mint.

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use time::OffsetDateTime;
use verimail_shared::bus::Topology;
use verimail_shared::events::EMAIL_VERIFIED;
use verimail_shared::token::{Claims, Signer};
use verimail_tests::env::TestEnv;
use verimail_tests::procs::{Proc, wait_http_ok};

use crate::broker::*;
use crate::http_load::*;
use crate::results::*;
use crate::system::*;
use crate::tap::*;

pub(crate) fn mint_tokens(env: &TestEnv, n: usize, file: &Path) -> Result<f64> {
    let config = env.config();
    let signer = Signer::new(&config.keys()?, config.itsdangerous_digest);
    let now = OffsetDateTime::now_utc();
    let issued_at = OffsetDateTime::from_unix_timestamp(now.unix_timestamp())?;
    let expires_at = issued_at + Duration::from_secs(3600);
    let prefix = unique_prefix();
    let started = Instant::now();
    let mut w = std::io::BufWriter::new(std::fs::File::create(file)?);
    for i in 0..n {
        let claims = Claims {
            request_id: uuid::Uuid::now_v7().to_string(),
            user_id: format!("{prefix}-{i}"),
            email: format!("{prefix}-{i}@example.com"),
            purpose: "verify_email".into(),
            locale: None,
            issued_at,
            expires_at,
        };
        writeln!(w, "{}", signer.mint_v1(&claims))?;
    }
    w.flush()?;
    Ok(started.elapsed().as_secs_f64())
}

pub(crate) async fn gateway(out: &Results, tokens: usize, lua: &Path, wrk: &WrkArgs) -> Result<()> {
    let mut env = TestEnv::new("bgw");
    env.set("CONFIRM_RATE_LIMIT_PER_MINUTE", "100000000");
    // The reference app confirms on GET, and wrk sends GETs: compare like for like.
    env.set("CONFIRM_ON_GET", "true");
    env.set("LOG_FORMAT", "json");
    env.set("RUST_LOG", "warn");
    let file = std::env::temp_dir().join(format!("{}-tokens.txt", env.namespace));
    let result = gateway_in(&env, out, tokens, lua, wrk, &file).await;
    let _ = std::fs::remove_file(&file);
    env.cleanup().await;
    result
}

pub(crate) async fn gateway_in(
    env: &TestEnv,
    out: &Results,
    tokens: usize,
    lua: &Path,
    wrk: &WrkArgs,
    file: &Path,
) -> Result<()> {
    let (conn, tap) = verified_tap(env).await?;
    let secs = mint_tokens(env, tokens + 1, file)?;
    println!("  minted {} v1 tokens in {secs:.2} s", tokens + 1);
    // The last token is the probe; wrk reads the file as is (the probe is then `already`).
    let probe = std::fs::read_to_string(file)?
        .lines()
        .last()
        .unwrap_or_default()
        .to_owned();

    let mut gw = ready_gateway(env).await?;
    let base = env.gateway_url();
    let ops = env.gateway_ops_url();
    let (status, _, body) =
        verimail_tests::http::get(&format!("{base}/confirm/{probe}"), &[]).await?;
    println!("  probe: GET /confirm/<fresh token> answered {status}");
    if status != 200 {
        println!("  body: {}", body.chars().take(300).collect::<String>());
    }

    let gw_pid = gw.pid().unwrap_or(0);
    let cpu0 = cpu_ticks(gw_pid).unwrap_or(0);
    let machine0 = machine_ticks();
    let load = run_wrk(&base, file, lua, wrk, "once").await;
    let machine1 = machine_ticks();
    let cpu_ms = cpu_ticks(gw_pid).unwrap_or(0).saturating_sub(cpu0) as f64 * tick_ms();
    let pid = gw.pid().unwrap_or(0);
    let rss = status_kib(pid, "VmRSS").unwrap_or(0);
    let hwm = status_kib(pid, "VmHWM").unwrap_or(0);
    let running = gw.is_running();
    let load = match load {
        Ok(load) => load,
        Err(e) => {
            gw.stop(Duration::from_secs(10)).await;
            return Err(e);
        }
    };
    println!(
        "  gateway: VmRSS {} after the load, peak VmHWM {}",
        mib(rss),
        mib(hwm)
    );
    print_step_means("gateway", &format!("{ops}/metrics")).await;
    let requests = load.requests.max(1) as f64;
    println!(
        "  CPU: gateway used {cpu_ms:.0} ms during the load ({:.0} % of one core), {:.3} ms per request; \
         machine CPU busy {:.0} % (wrk, PostgreSQL and RabbitMQ on the same 2 cores)",
        cpu_ms / (wrk.duration as f64 * 10.0),
        cpu_ms / requests,
        busy_percent(machine0, machine1)
    );
    out.put(
        "gateway_cpu_ms_per_req",
        format!("{:.3}", cpu_ms / requests),
    )?;
    // The outbox relays the verified events after the answers: how far behind is it?
    let expected = usize::try_from(load.ok).unwrap_or(0) + 1;
    let t = Instant::now();
    let relayed = tap.wait(expected, Duration::from_secs(10)).await;
    println!(
        "  verified events relayed: {relayed} distinct of {expected} confirmations ({:.1} s after the load ended; {})",
        t.elapsed().as_secs_f64(),
        tap.breakdown()
    );
    let log = log_tail(&gw, 10);
    if !running {
        println!("--- gateway log (tail) ---\n{log}");
    } else if !log.is_empty() {
        println!("  gateway logged (tail):");
        for l in log.lines().take(5) {
            println!("    {l}");
        }
    }
    gw.stop(Duration::from_secs(15)).await;
    load.record(out, "gateway")?;
    out.put("gateway_rss_kib", rss)?;
    out.put("gateway_hwm_kib", hwm)?;
    out.put("gateway_events", relayed)?;
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

/// The database migrated, the namespace's topology declared and a tap counting
/// `verimail.email.verified`, so the outbox relay's mandatory publishes are
/// routable (and counted). The connection must outlive the tap.
pub(crate) async fn verified_tap(env: &TestEnv) -> Result<(lapin::Connection, Tap)> {
    let url = env.get("AMQP_URL").context("AMQP_URL")?.to_owned();
    let topology = Topology::new(env.namespace.clone());
    prepare_db(env).await?;
    let conn = amqp(&url).await?;
    verimail_shared::bus::declare(&conn.create_channel().await?, &topology).await?;
    let tap = Tap::start(&conn, topology.exchange(), &[EMAIL_VERIFIED], false).await?;
    Ok((conn, tap))
}

/// Starts the gateway and waits for its `/readyz` (on its own METRICS_ADDR).
pub(crate) async fn ready_gateway(env: &TestEnv) -> Result<Proc> {
    let gw = Proc::start("verimail-gateway", &[], env);
    let ops = env.gateway_ops_url();
    if !wait_http_ok(&format!("{ops}/readyz"), Duration::from_secs(30)).await {
        println!("--- gateway log (tail) ---\n{}", log_tail(&gw, 20));
        gw.stop(Duration::from_secs(10)).await;
        bail!("the gateway did not become ready at {ops}/readyz");
    }
    Ok(gw)
}
