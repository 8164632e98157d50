//! Mails per second for `docs/operations.md` (ignored: run by hand): a
//! preloaded namespace drained by 1, 2, 4 workers, with the CPU each part
//! of the system spent per mail.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::ensure;
use lapin::options::QueueDeleteOptions;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_util::sync::CancellationToken;
use verimail_shared::bus::{Bus, Publisher, Topology, declare_subscriber};
use verimail_shared::events::VERIFICATION_SENT;
use verimail_tests::env::{TestEnv, free_port};
use verimail_tests::procs::tail;
use verimail_tests::smtp::SmtpServer;

use crate::support::{Seen, cluster, env_or, lock, publish_paced, run_tap};
use crate::{CLUSTER, TAPPED, WAIT};

/// CPU time (user + system, in clock ticks of 10 ms) a process has used.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command: state is the first; utime and
    // stime are the 12th and 13th.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Pids whose command name (`/proc/PID/comm`) is `comm`.
fn pids_named(comm: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .collect()
}

/// The Erlang VMs of the broker measured: the cluster's three (their pid
/// files), or the machine's own (every other `beam.smp`).
fn broker_pids(single: bool) -> Vec<u32> {
    let cluster: Vec<u32> = (1..=3)
        .filter_map(|i| {
            std::fs::read_to_string(format!("/tmp/verimail-cluster/vmc{i}/vmc{i}.pid")).ok()
        })
        .filter_map(|p| p.trim().parse().ok())
        .collect();
    if single {
        pids_named("beam.smp")
            .into_iter()
            .filter(|p| !cluster.contains(p))
            .collect()
    } else {
        cluster
    }
}

/// CPU ticks per pid, now.
fn cpu_snapshot(pids: &[u32]) -> HashMap<u32, u64> {
    pids.iter()
        .filter_map(|p| Some((*p, cpu_ticks(*p)?)))
        .collect()
}

/// CPU seconds used between two snapshots (a pid new in `after` counts from 0).
fn cpu_used(before: &HashMap<u32, u64>, after: &HashMap<u32, u64>) -> f64 {
    after
        .iter()
        .map(|(pid, t)| t.saturating_sub(before.get(pid).copied().unwrap_or(0)))
        .sum::<u64>() as f64
        / 100.0
}

/// The worker binary measured: `$VERIMAIL_BIN_DIR/verimail-worker`, else
/// target/release's when it exists, else the debug build next to this test.
fn worker_binary() -> PathBuf {
    if let Ok(dir) = std::env::var("VERIMAIL_BIN_DIR") {
        return PathBuf::from(dir).join("verimail-worker");
    }
    let release = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/release/verimail-worker"
    ));
    if release.exists() {
        return release;
    }
    verimail_tests::procs::bin_path("verimail-worker")
}

/// Mails per second: preload `MEASURE_N` requests (default 5000) into a fresh
/// namespace, start `MEASURE_WORKERS` worker processes (default `1,2,4`, one
/// run each) with `WORKER_CONCURRENCY` 64, and time from their start to the
/// last outcome. `MEASURE_BROKER=single` uses the machine's broker
/// (127.0.0.1:5672); anything else the three-node cluster (all three URLs to
/// every process). The SMTP server is the in-test one (accepts instantly),
/// or `MEASURE_MAIL_URL` (e.g. `smtp+plain://127.0.0.1:2525`, an smtp-sink).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement for docs/operations.md: run by hand with --ignored --nocapture"]
async fn measure_drain_throughput() -> anyhow::Result<()> {
    let _only_one = CLUSTER.lock().await;
    let n: usize = env_or("MEASURE_N", 5000);
    let single = std::env::var("MEASURE_BROKER").is_ok_and(|b| b == "single");
    let workers: Vec<usize> = std::env::var("MEASURE_WORKERS")
        .unwrap_or_else(|_| "1,2,4".into())
        .split(',')
        .filter_map(|w| w.trim().parse().ok())
        .collect();
    let urls: Vec<String> = if single {
        vec!["amqp://guest:guest@127.0.0.1:5672/%2f".to_owned()]
    } else {
        cluster(&["up"])
            .await?
            .split(',')
            .map(str::to_owned)
            .collect()
    };
    let bin = worker_binary();
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .map(OffsetDateTime::from)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default();
    println!(
        "== drain throughput: {n} requests, broker {}, worker {} (built {built})",
        if single {
            "single node 127.0.0.1:5672"
        } else {
            "three-node cluster"
        },
        bin.display()
    );
    for p in workers {
        drain_with(p, n, single, &urls, &bin).await?;
    }
    Ok(())
}

/// One run of [`measure_drain_throughput`]: `n` requests preloaded into a
/// fresh namespace, drained by `p` worker processes of `bin`; prints the
/// figures.
async fn drain_with(
    p: usize,
    n: usize,
    single: bool,
    urls: &[String],
    bin: &Path,
) -> anyhow::Result<()> {
    let mut env = TestEnv::new("measure");
    let smtp = SmtpServer::start();
    env.set("AMQP_URL", urls.join(","));
    // MEASURE_MAIL_URL: an outside sink (smtp-sink) instead of the in-test server.
    env.set(
        "MAIL_URL",
        std::env::var("MEASURE_MAIL_URL").unwrap_or_else(|_| smtp.mail_url()),
    );
    env.set("WORKER_CONCURRENCY", "64");
    env.set("RUST_LOG", "warn");
    let topology = Topology::new(env.namespace.clone());
    let pool = verimail_shared::db::connect(
        env.get("DATABASE_URL").unwrap_or_default(),
        true,
        verimail_shared::db::PoolSettings::default(),
    )
    .await?;
    pool.close().await;

    let stop = CancellationToken::new();
    let bus = Bus::connect(urls, "measure", &stop).await?;
    let ch = bus.channel().await?;
    verimail_shared::bus::declare(&ch, &topology).await?;
    let tap_queue = declare_subscriber(&ch, &topology, "measure-tap", TAPPED).await?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let tap = tokio::spawn(run_tap(
        bus.clone(),
        tap_queue.clone(),
        seen.clone(),
        Arc::new(AtomicU64::new(0)),
        stop.clone(),
    ));
    let publisher = Arc::new(Publisher::new(bus.clone()));
    let t_pre = Instant::now();
    let pre = publish_paced(publisher, topology.clone(), n, 1e9).await;
    let pre_secs = t_pre.elapsed().as_secs_f64();
    ensure!(
        pre.unconfirmed.is_empty(),
        "preload: {} unconfirmed",
        pre.unconfirmed.len()
    );

    // CPU before: broker, PostgreSQL (every backend: others' too, so
    // approximate), this process (tap and, unless MEASURE_MAIL_URL, SMTP).
    let me = std::process::id();
    let broker_before = cpu_snapshot(&broker_pids(single));
    let pg_before = cpu_snapshot(&pids_named("postgres"));
    let me_before = cpu_ticks(me).unwrap_or(0);
    let t0 = Instant::now();
    let mut procs = Vec::new();
    for _ in 0..p {
        let log =
            std::env::temp_dir().join(format!("{}-worker-{}.log", env.namespace, procs.len()));
        let file = std::fs::File::create(&log)?;
        let child = tokio::process::Command::new(bin)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(&env.vars)
            .env("METRICS_ADDR", format!("127.0.0.1:{}", free_port()))
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .kill_on_drop(true)
            .spawn()?;
        procs.push((child, log));
    }
    let mut last = (0, Instant::now());
    let finished = loop {
        let got = lock(&seen).outcomes.len();
        if got >= n {
            break true;
        }
        if got != last.0 {
            last = (got, Instant::now());
        }
        if last.1.elapsed() > WAIT {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (secs, steady, sent) = {
        let s = lock(&seen);
        let end = s.outcome_arrivals.iter().max().copied().unwrap_or(t0);
        let first = s.outcome_arrivals.iter().min().copied().unwrap_or(t0);
        let sent = s
            .outcome_type
            .values()
            .filter(|t| *t == VERIFICATION_SENT)
            .count();
        let steady = (n.saturating_sub(1)) as f64 / (end - first).as_secs_f64().max(1e-3);
        ((end - t0).as_secs_f64(), steady, sent)
    };
    let wall = t0.elapsed().as_secs_f64();
    let worker_pids: Vec<u32> = procs.iter().filter_map(|(c, _)| c.id()).collect();
    let worker_cpu = cpu_used(&HashMap::new(), &cpu_snapshot(&worker_pids));
    let broker_cpu = cpu_used(&broker_before, &cpu_snapshot(&broker_pids(single)));
    let pg_cpu = cpu_used(&pg_before, &cpu_snapshot(&pids_named("postgres")));
    let me_cpu = cpu_ticks(me).unwrap_or(0).saturating_sub(me_before) as f64 / 100.0;
    let per_mail = |secs: f64| secs * 1000.0 / n as f64;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "{p} worker(s): {} of {n} outcomes ({sent} sent, {} mails) in {secs:.2} s from process start: {:.0} mails/s, \
         first to last outcome {steady:.0}/s (preload {:.0}/s; load {})",
        lock(&seen).outcomes.len(),
        smtp.count(),
        n as f64 / secs,
        n as f64 / pre_secs,
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "  CPU per mail: worker {:.2} ms, broker {:.2} ms, PostgreSQL {:.2} ms (all backends), this test {:.2} ms; \
         {:.1} CPU-s in {wall:.1} s",
        per_mail(worker_cpu),
        per_mail(broker_cpu),
        per_mail(pg_cpu),
        per_mail(me_cpu),
        worker_cpu + broker_cpu + pg_cpu + me_cpu
    );
    let sizes: Result<(i64, i64, i64), sqlx::Error> = async {
        let pool = sqlx::PgPool::connect(env.get("DATABASE_URL").unwrap_or_default()).await?;
        let row = sqlx::query_as(
            "SELECT (SELECT count(*) FROM requests), pg_total_relation_size('requests'), \
             pg_total_relation_size('throttle')",
        )
        .fetch_one(&pool)
        .await;
        pool.close().await;
        row
    }
    .await;
    if let Ok((rows, requests_bytes, throttle_bytes)) = sizes {
        println!(
            "  tables: {rows} requests rows, {} bytes each with indexes; throttle {} bytes per row",
            requests_bytes / rows.max(1),
            throttle_bytes / rows.max(1)
        );
    }
    for (child, _) in &procs {
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
    for (mut child, log) in procs {
        let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
        if !finished {
            println!(
                "--- {} ---\n{}",
                log.display(),
                tail(&std::fs::read_to_string(&log).unwrap_or_default(), 20)
            );
        }
        let _ = std::fs::remove_file(log);
    }
    stop.cancel();
    let _ = tap.await;
    if let Ok(ch) = bus.channel().await {
        let _ = ch
            .queue_delete(tap_queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    bus.close().await;
    env.cleanup().await;
    ensure!(finished, "{p} worker(s) stopped making progress");
    Ok(())
}
