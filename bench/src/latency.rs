//! `verimail-bench latency`: publish-to-SMTP-acceptance latency at fixed offered rates.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use lapin::Channel;
use lapin::options::ConfirmSelectOptions;
use serde_json::json;
use verimail_shared::bus::Topology;
use verimail_shared::events::VERIFICATION_REQUESTED;
use verimail_tests::env::TestEnv;
use verimail_tests::procs::Proc;

use crate::broker::*;
use crate::results::*;
use crate::system::*;
use crate::tap::*;

pub(crate) async fn latency(
    out: &Results,
    rates: &[u32],
    seconds: u64,
    mail_url: &str,
    concurrency: u16,
) -> Result<()> {
    let env = bench_env("blat", mail_url, concurrency);
    out.put("latency_concurrency", concurrency)?;
    let result = latency_in(&env, out, rates, seconds).await;
    env.cleanup().await;
    result
}

pub(crate) async fn latency_in(
    env: &TestEnv,
    out: &Results,
    rates: &[u32],
    seconds: u64,
) -> Result<()> {
    let url = env.get("AMQP_URL").context("AMQP_URL")?.to_owned();
    let topology = Topology::new(env.namespace.clone());
    prepare_db(env).await?;
    let conn = amqp(&url).await?;
    verimail_shared::bus::declare(&conn.create_channel().await?, &topology).await?;
    let tap = Tap::start(&conn, topology.exchange(), OUTCOMES, true).await?;
    let publisher = conn.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut worker = Proc::start("verimail-worker", &[], env);
    let prefix = unique_prefix();

    // Warm-up: connections opened, caches filled, before anything is timed.
    let warm = offer(&publisher, &topology, &prefix, "warmup", 200, 1).await?;
    let seen = tap
        .wait_with(warm, Duration::from_secs(30), || worker.is_running())
        .await;
    if seen < warm {
        println!("--- worker log (tail) ---\n{}", log_tail(&worker, 20));
        worker.stop(Duration::from_secs(10)).await;
        bail!("latency: the worker answered {seen} of {warm} warm-up requests");
    }

    for &r in rates {
        let phase = format!("r{r}");
        let before = tap.total();
        let published = offer(&publisher, &topology, &prefix, &phase, r, seconds).await?;
        let target = usize::try_from(before).unwrap_or(0) + published;
        tap.wait_with(target, Duration::from_secs(30), || worker.is_running())
            .await;
        let samples = tap.samples(&phase);
        let mut to_sent: Vec<f64> = samples.iter().map(|s| s.to_sent_ms).collect();
        let mut to_arrival: Vec<f64> = samples.iter().map(|s| s.to_arrival_ms).collect();
        let (s50, s99, smax) = percentiles(&mut to_sent);
        let (a50, a99, _) = percentiles(&mut to_arrival);
        println!(
            "  {r}/s for {seconds} s: {published} published, {} sent outcomes; publish→sent_at p50 {s50:.1} ms, \
             p99 {s99:.1} ms, max {smax:.1} ms (publish→outcome arrival p50 {a50:.1} ms, p99 {a99:.1} ms)",
            samples.len()
        );
        out.put(&format!("latency_{r}_published"), published)?;
        out.put(&format!("latency_{r}_sent"), samples.len())?;
        out.put(&format!("latency_{r}_p50_ms"), format!("{s50:.1}"))?;
        out.put(&format!("latency_{r}_p99_ms"), format!("{s99:.1}"))?;
        out.put(&format!("latency_{r}_arrival_p99_ms"), format!("{a99:.1}"))?;
    }
    let pid = worker.pid().unwrap_or(0);
    let rss = status_kib(pid, "VmRSS").unwrap_or(0);
    let hwm = status_kib(pid, "VmHWM").unwrap_or(0);
    println!("  worker: VmRSS {}, peak VmHWM {}", mib(rss), mib(hwm));
    out.put("latency_worker_hwm_kib", hwm)?;
    worker.stop(Duration::from_secs(15)).await;
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

/// Publishes `per_second` requests a second for `seconds` (open loop: the
/// schedule does not wait for the worker), each stamping its publish time in
/// `data.context`; confirms are awaited off the schedule. Returns how many.
pub(crate) async fn offer(
    ch: &Channel,
    topology: &Topology,
    prefix: &str,
    phase: &str,
    per_second: u32,
    seconds: u64,
) -> Result<usize> {
    let total = u64::from(per_second) * seconds;
    let started = Instant::now();
    let mut published = 0u64;
    let failures = Arc::new(AtomicU64::new(0));
    let mut confirms = Vec::new();
    while published < total {
        let due = ((started.elapsed().as_secs_f64() * f64::from(per_second)) as u64 + 1).min(total);
        while published < due {
            let id = uuid::Uuid::now_v7().to_string();
            let user = format!("{prefix}-{phase}-{published}");
            let context = json!({"bench_phase": phase, "bench_published_at": now_rfc3339()});
            let body = request_body(&id, &user, Some(context));
            let confirm = ch
                .basic_publish(
                    topology.exchange().into(),
                    VERIFICATION_REQUESTED.into(),
                    MANDATORY,
                    &body,
                    event_props(&id, VERIFICATION_REQUESTED),
                )
                .await?;
            let failures = failures.clone();
            confirms.push(tokio::spawn(async move {
                let ok = confirm
                    .await
                    .map_err(anyhow::Error::from)
                    .and_then(check_confirm);
                if ok.is_err() {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }));
            published += 1;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let achieved = total as f64 / started.elapsed().as_secs_f64();
    for c in confirms {
        let _ = c.await;
    }
    let failed = failures.load(Ordering::Relaxed);
    if failed > 0 {
        bail!("{failed} publishes were not confirmed");
    }
    if achieved < f64::from(per_second) * 0.95 {
        println!("  (offered only {achieved:.0}/s of {per_second}/s: the publisher fell behind)");
    }
    Ok(usize::try_from(total).unwrap_or(usize::MAX))
}

/// p50, p99, max (nearest rank) of `v`, sorted in place.
pub(crate) fn percentiles(v: &mut [f64]) -> (f64, f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    (at(0.50), at(0.99), v[v.len() - 1])
}
