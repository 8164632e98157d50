//! `verimail-bench ceiling`: the broker-only ceiling, what RabbitMQ allows a
//! consumer that publishes one confirmed outcome per message and acks after the confirm.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use serde_json::json;
use verimail_shared::bus::Topology;
use verimail_shared::events::VERIFICATION_SENT;
use verimail_tests::env::TestEnv;

use crate::broker::*;
use crate::results::*;
use crate::system::*;
use crate::tap::*;

pub(crate) async fn ceiling(out: &Results, n: usize, prefetch: u16) -> Result<()> {
    let env = TestEnv::new("bceil");
    let result = ceiling_in(&env, out, n, prefetch).await;
    env.cleanup().await;
    result
}

pub(crate) async fn ceiling_in(
    env: &TestEnv,
    out: &Results,
    n: usize,
    prefetch: u16,
) -> Result<()> {
    let url = env.get("AMQP_URL").context("AMQP_URL")?.to_owned();
    let topology = Topology::new(env.namespace.clone());
    let setup = amqp(&url).await?;
    verimail_shared::bus::declare(&setup.create_channel().await?, &topology).await?;
    let tap = Tap::start(&setup, topology.exchange(), OUTCOMES, false).await?;
    let (secs, per_s) = preload(&setup, &topology, n, &unique_prefix()).await?;
    println!("  preloaded {n} requests in {secs:.2} s ({per_s:.0}/s)");

    // The consumer side, on its own connection as a worker process would be:
    // one channel consuming, one confirm channel publishing the outcomes. It
    // runs on a runtime of its own (two threads, as a worker has on two cores),
    // so that its CPU (those threads, which also run its connection's I/O loop:
    // vendor/lapin) can be told apart from the tap's.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(CONSUMER_THREADS)
        .enable_all()
        .build()?;
    let t0 = Instant::now();
    let machine0 = machine_ticks();
    let errors = Arc::new(AtomicU64::new(0));
    let (conn, pump) = runtime
        .spawn(consume(url, topology.clone(), prefetch, errors.clone()))
        .await??;
    let consumer_ticks = || own_threads_ticks(|_, name| name == CONSUMER_THREADS);
    let cpu0 = consumer_ticks();
    let seen = tap.wait(n, Duration::from_secs(20)).await;
    let end = tap.last_at().unwrap_or_else(Instant::now);
    let cpu_ms = consumer_ticks().saturating_sub(cpu0) as f64 * tick_ms();
    let secs = (end - t0).as_secs_f64();
    pump.abort();
    let _ = conn.close(200, "done".into()).await;
    runtime.shutdown_background();
    let _ = setup.close(200, "done".into()).await;
    if seen < n {
        bail!(
            "ceiling: only {seen} of {n} outcomes arrived ({} publish errors)",
            errors.load(Ordering::Relaxed)
        );
    }
    let per_s = rate(n, secs);
    let own = cpu_ms / n as f64;
    println!(
        "  ceiling: {n} messages in {secs:.2} s: {per_s:.0} msg/s; the consumer's own CPU \
         {own:.3} ms per message (machine CPU busy {:.0} %)",
        busy_percent(machine0, machine_ticks())
    );
    out.put("ceiling_n", n)?;
    out.put("ceiling_consumer_cpu_ms_per_msg", format!("{own:.3}"))?;
    out.put("ceiling_prefetch", prefetch)?;
    out.put("ceiling_mps", format!("{per_s:.0}"))?;
    Ok(())
}

/// Name of the consumer's runtime threads (at most 15 bytes: Linux cuts thread names there).
const CONSUMER_THREADS: &str = "ceiling-rt";

/// Connects, starts consuming, and spawns the task that answers every
/// delivery with one confirmed outcome and its ack; returns the connection
/// and that task.
async fn consume(
    url: String,
    topology: Topology,
    prefetch: u16,
    errors: Arc<AtomicU64>,
) -> Result<(lapin::Connection, tokio::task::JoinHandle<()>)> {
    let conn = amqp(&url).await?;
    let consume = conn.create_channel().await?;
    consume
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let publish = conn.create_channel().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut consumer = consume
        .basic_consume(
            topology.worker_queue().as_str().into(),
            "bench-ceiling".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let exchange = topology.exchange().to_owned();
    let errs = errors;
    let pump = tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            let publish = publish.clone();
            let exchange = exchange.clone();
            let errs = errs.clone();
            tokio::spawn(async move {
                let id = uuid::Uuid::now_v7().to_string();
                // About the size of a real `sent` outcome.
                let body = json!({
                    "specversion": "1.0", "id": id, "source": "/bench/ceiling",
                    "type": VERIFICATION_SENT, "time": now_rfc3339(),
                    "datacontenttype": "application/json",
                    "data": {"request_id": id, "user_id": "u", "email": "u@example.com",
                             "purpose": "verify_email", "context": null,
                             "sent_at": now_rfc3339(), "expires_at": now_rfc3339()}
                });
                let body = serde_json::to_vec(&body).unwrap_or_default();
                let confirmed = match publish
                    .basic_publish(
                        exchange.as_str().into(),
                        VERIFICATION_SENT.into(),
                        MANDATORY,
                        &body,
                        event_props(&id, VERIFICATION_SENT),
                    )
                    .await
                {
                    Ok(confirm) => confirm.await.map_err(anyhow::Error::from),
                    Err(e) => Err(e.into()),
                };
                match confirmed.and_then(check_confirm) {
                    Ok(()) => {
                        let _ = delivery
                            .acker
                            .ack(lapin::options::BasicAckOptions::default())
                            .await;
                    }
                    Err(_) => {
                        errs.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    Ok((conn, pump))
}
