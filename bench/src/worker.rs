//! `verimail-bench worker`: verimail-worker throughput with 1, 2, 4 processes
//! over a preloaded queue, with CPU and memory per process.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use verimail_shared::bus::Topology;
use verimail_tests::env::{TestEnv, free_port};
use verimail_tests::procs::Proc;

use crate::broker::*;
use crate::results::*;
use crate::system::*;
use crate::tap::*;

/// What one worker run measured.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RunFigures {
    /// Mails/s from the workers' start to the last outcome.
    pub(crate) per_s: f64,
    /// Mails/s from the first outcome to the last.
    pub(crate) steady: f64,
    /// The workers' CPU per mail, ms.
    pub(crate) worker_ms: f64,
    /// This database's backends' CPU per mail, ms.
    pub(crate) pg_ms: f64,
}

pub(crate) async fn worker_run(
    out: &Results,
    label: &str,
    n: usize,
    processes: usize,
    mail_url: &str,
    concurrency: u16,
    suppressions: usize,
) -> Result<RunFigures> {
    let env = bench_env(&format!("bw{processes}"), mail_url, concurrency);
    let result = async {
        prepare_db(&env).await?;
        if suppressions > 0 {
            load_suppressions(&env, suppressions).await?;
        }
        settle_db(&env).await?;
        worker_run_in(&env, out, label, n, processes, concurrency).await
    }
    .await;
    env.cleanup().await;
    result
}

/// Fills the suppression list with `n` addresses no request of the bench
/// uses, then refreshes the planner's statistics, as a long-running
/// deployment's would be.
async fn load_suppressions(env: &TestEnv, n: usize) -> Result<()> {
    let url = env.get("DATABASE_URL").context("DATABASE_URL")?;
    let pool =
        verimail_shared::db::connect(url, true, verimail_shared::db::PoolSettings::default())
            .await?;
    let t = Instant::now();
    sqlx::query(
        "INSERT INTO suppressions (email, reason, source) \
         SELECT 'gone-' || g || '@suppressed.bench.invalid', 'bounce', 'bench' \
         FROM generate_series(1, $1) g",
    )
    .bind(i64::try_from(n).unwrap_or(i64::MAX))
    .execute(&pool)
    .await?;
    // VACUUM sets the hint bits and the visibility map now, so neither the
    // first lookups nor an autovacuum woken by the load write during the run.
    sqlx::query("VACUUM ANALYZE suppressions")
        .execute(&pool)
        .await?;
    pool.close().await;
    println!(
        "  suppression list: {n} entries loaded in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A checkpoint before every run, so no run pays for the writes of the one
/// before it (or of its own setup) in the checkpointer's background work.
async fn settle_db(env: &TestEnv) -> Result<()> {
    let url = env.get("DATABASE_URL").context("DATABASE_URL")?;
    let pool =
        verimail_shared::db::connect(url, false, verimail_shared::db::PoolSettings::default())
            .await?;
    sqlx::query("CHECKPOINT").execute(&pool).await?;
    pool.close().await;
    Ok(())
}

pub(crate) async fn worker_run_in(
    env: &TestEnv,
    out: &Results,
    label: &str,
    n: usize,
    processes: usize,
    concurrency: u16,
) -> Result<RunFigures> {
    println!(
        "== worker throughput: {processes} process(es), WORKER_CONCURRENCY {concurrency}, {n} requests preloaded"
    );
    let url = env.get("AMQP_URL").context("AMQP_URL")?.to_owned();
    let topology = Topology::new(env.namespace.clone());
    prepare_db(env).await?;
    let conn = amqp(&url).await?;
    verimail_shared::bus::declare(&conn.create_channel().await?, &topology).await?;
    let tap = Tap::start(&conn, topology.exchange(), OUTCOMES, false).await?;
    let (secs, per_s) = preload(&conn, &topology, n, &unique_prefix()).await?;
    println!("  preloaded in {secs:.2} s ({per_s:.0}/s)");

    let t0 = Instant::now();
    let machine0 = machine_ticks();
    let servers0 = ServerCpu::snapshot(&env.database);
    let mut metrics_addrs = Vec::new();
    let mut procs: Vec<Proc> = (0..processes)
        .map(|_| {
            let mut e = env.clone();
            let addr = format!("127.0.0.1:{}", free_port());
            e.set("METRICS_ADDR", addr.clone());
            metrics_addrs.push(addr);
            Proc::start("verimail-worker", &[], &e)
        })
        .collect();
    let seen = tap
        .wait_with(n, Duration::from_secs(30), || {
            procs.iter_mut().all(Proc::is_running)
        })
        .await;
    let end = tap.last_at().unwrap_or_else(Instant::now);
    let machine1 = machine_ticks();
    let servers1 = ServerCpu::snapshot(&env.database);
    let cpu: u64 = procs.iter().filter_map(|p| cpu_ticks(p.pid()?)).sum();
    let cpu_ms = cpu as f64 * tick_ms();
    let mut rss = 0;
    let mut hwm = 0;
    for (i, p) in procs.iter().enumerate() {
        let pid = p.pid().unwrap_or(0);
        let r = status_kib(pid, "VmRSS").unwrap_or(0);
        let h = status_kib(pid, "VmHWM").unwrap_or(0);
        println!(
            "  worker {i} (pid {pid}): VmRSS {}, peak VmHWM {}",
            mib(r),
            mib(h)
        );
        rss = rss.max(r);
        hwm = hwm.max(h);
    }
    if let Some(addr) = metrics_addrs.first() {
        print_step_means("worker 0", &format!("http://{addr}/metrics")).await;
    }
    let logs: Vec<String> = procs.iter().map(|p| log_tail(p, 15)).collect();
    for p in procs {
        p.stop(Duration::from_secs(15)).await;
    }
    let failures = tap.failures();
    if !failures.is_empty() {
        println!("  first failed outcomes:");
        for f in &failures {
            println!("    {f}");
        }
    }
    if seen < n {
        for (i, log) in logs.iter().enumerate() {
            println!("  --- worker {i} log (tail) ---\n{log}");
        }
        bail!(
            "worker: only {seen} of {n} outcomes arrived ({}); stopped waiting",
            tap.breakdown()
        );
    }
    let secs = (end - t0).as_secs_f64();
    let per_s = rate(n, secs);
    let steady = match tap.first_at() {
        Some(first) if end > first => rate(n.saturating_sub(1), (end - first).as_secs_f64()),
        _ => 0.0,
    };
    let per = |who: &[Server]| servers0.ms_since(&servers1, who) / n as f64;
    let (pg, pg_bg, broker) = (
        per(&[Server::PostgresBackends]),
        per(&[Server::PostgresBackground]),
        per(&[Server::Rabbitmq]),
    );
    println!(
        "  {processes} worker(s): {n} outcomes ({}) in {secs:.2} s from process start: {per_s:.0} mails/s \
         (first→last outcome: {steady:.0}/s); CPU per mail: worker(s) {:.3} ms, PostgreSQL {pg:.3} ms",
        tap.breakdown(),
        cpu_ms / n as f64
    );
    println!(
        "  CPU: workers used {cpu_ms:.0} ms in all; PostgreSQL per mail: {pg:.3} ms in this database's \
         backends + {pg_bg:.3} ms in the server's background processes (WAL writer, checkpointer: \
         shared); RabbitMQ {broker:.3} ms per mail (the whole broker, shared); machine CPU busy {:.0} % \
         (2 cores shared with RabbitMQ, PostgreSQL, the sink and this tap)",
        busy_percent(machine0, machine1)
    );
    let warn_lines = logs.iter().map(|l| l.lines().count()).sum::<usize>();
    if warn_lines > 0 {
        println!("  (workers logged {warn_lines} warning/error lines; tail of the first:)");
        if let Some(first) = logs.iter().find(|l| !l.is_empty()) {
            for l in first.lines().take(5) {
                println!("    {l}");
            }
        }
    }
    let k = format!("{label}_{processes}");
    out.put(&format!("{k}_n"), n)?;
    out.put(&format!("{k}_concurrency"), concurrency)?;
    out.put(&format!("{k}_mps"), format!("{per_s:.0}"))?;
    out.put(&format!("{k}_steady_mps"), format!("{steady:.0}"))?;
    out.put(&format!("{k}_sent"), tap.sent())?;
    out.put(&format!("{k}_rss_kib"), rss)?;
    out.put(&format!("{k}_hwm_kib"), hwm)?;
    out.put(
        &format!("{k}_cpu_ms_per_mail"),
        format!("{:.3}", cpu_ms / n as f64),
    )?;
    out.put(&format!("{k}_pg_cpu_ms_per_mail"), format!("{pg:.3}"))?;
    out.put(&format!("{k}_pg_bg_cpu_ms_per_mail"), format!("{pg_bg:.3}"))?;
    out.put(
        &format!("{k}_broker_cpu_ms_per_mail"),
        format!("{broker:.3}"),
    )?;
    let _ = conn.close(200, "done".into()).await;
    Ok(RunFigures {
        per_s,
        steady,
        worker_ms: cpu_ms / n as f64,
        pg_ms: pg,
    })
}

/// Issue 17's check, on the runs of one `--suppressions` list: for each list
/// size the median of its runs (interleave the sizes, `0,100000,100000,0`,
/// so drift during the session falls on both), and the ratio of the largest
/// list's median mails/s to the empty list's.
pub(crate) fn compare_suppressions(
    out: &Results,
    label: &str,
    processes: usize,
    runs: &[(usize, RunFigures)],
) -> Result<()> {
    let mut sizes: Vec<usize> = runs.iter().map(|(s, _)| *s).collect();
    sizes.sort_unstable();
    sizes.dedup();
    println!("== suppression list sizes compared ({processes} process(es), medians of the runs)");
    let mut medians = Vec::new();
    for &size in &sizes {
        let of = |f: fn(&RunFigures) -> f64| {
            median(runs.iter().filter(|(s, _)| *s == size).map(|(_, r)| f(r)))
        };
        let (per_s, steady) = (of(|r| r.per_s), of(|r| r.steady));
        let (worker_ms, pg_ms) = (of(|r| r.worker_ms), of(|r| r.pg_ms));
        let count = runs.iter().filter(|(s, _)| *s == size).count();
        println!(
            "  {size:>7} entries, {count} run(s): {per_s:.0} mails/s (first→last {steady:.0}/s); \
             CPU per mail: worker {worker_ms:.3} ms, PostgreSQL {pg_ms:.3} ms"
        );
        let k = format!("{label}_{processes}_supp{size}_median");
        out.put(&format!("{k}_mps"), format!("{per_s:.0}"))?;
        out.put(&format!("{k}_pg_cpu_ms_per_mail"), format!("{pg_ms:.3}"))?;
        medians.push((size, per_s, pg_ms));
    }
    if let (Some(&(_, empty, _)), Some(&(size, full, _))) = (medians.first(), medians.last())
        && size > 0
        && empty > 0.0
    {
        let change = (full / empty - 1.0) * 100.0;
        println!(
            "  {size} entries vs none: {change:+.1} % mails/s (issue 17: within 5 %: {})",
            if change.abs() <= 5.0 {
                "MET"
            } else {
                "NOT MET"
            }
        );
        out.put(
            &format!("{label}_{processes}_supp_change_pct"),
            format!("{change:.1}"),
        )?;
    }
    Ok(())
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}
