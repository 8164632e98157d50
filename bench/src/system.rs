//! Processes and the machine: RSS and CPU time from /proc, the deployment a run
//! starts, and the timings a service reports on its `/metrics` page.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use verimail_tests::env::TestEnv;
use verimail_tests::procs::Proc;

/// A field of /proc/PID/status in KiB (`VmRSS`, `VmHWM`).
pub(crate) fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// `pid` and its direct children (gunicorn's master and workers).
pub(crate) fn process_tree(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            // Fields after the parenthesised command: state, ppid, ...
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(pid) {
                pids.push(child);
            }
        }
    }
    pids
}

/// CPU time (user + system) a process used so far, in clock ticks.
pub(crate) fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Milliseconds per clock tick (`getconf CLK_TCK`, usually 100 a second).
pub(crate) fn tick_ms() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .filter(|t| *t > 0.0)
        .map_or(10.0, |t| 1e3 / t)
}

/// The machine's (busy, total) CPU ticks so far, from /proc/stat.
pub(crate) fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().next() else {
        return (0, 0);
    };
    let v: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // idle + iowait are not busy.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// Busy share of all cores between two `machine_ticks` readings, in percent.
pub(crate) fn busy_percent(before: (u64, u64), after: (u64, u64)) -> f64 {
    let busy = after.0.saturating_sub(before.0) as f64;
    let total = after.1.saturating_sub(before.1) as f64;
    if total > 0.0 {
        busy / total * 100.0
    } else {
        0.0
    }
}

pub(crate) fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

pub(crate) fn rate(n: usize, secs: f64) -> f64 {
    if secs > 0.0 { n as f64 / secs } else { 0.0 }
}

/// A deployment for the benchmark: quiet JSON logs, the sink as mail server.
pub(crate) fn bench_env(label: &str, mail_url: &str, concurrency: u16) -> TestEnv {
    let mut env = TestEnv::new(label);
    env.set("MAIL_URL", mail_url);
    env.set("WORKER_CONCURRENCY", concurrency.to_string());
    env.set("LOG_FORMAT", "json");
    env.set("RUST_LOG", "warn");
    env
}

/// Creates the database and applies the migrations before any timed start,
/// as a deployment's database already exists.
pub(crate) async fn prepare_db(env: &TestEnv) -> Result<()> {
    let url = env.get("DATABASE_URL").context("DATABASE_URL")?;
    let pool =
        verimail_shared::db::connect(url, true, verimail_shared::db::PoolSettings::default())
            .await?;
    pool.close().await;
    Ok(())
}

pub(crate) fn log_tail(p: &Proc, lines: usize) -> String {
    let log = p.log();
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Prints the mean of every `*_seconds` and `*_size` histogram series on a
/// Prometheus `/metrics` page (sum / count): where a service says its time
/// goes, and how many jobs its batched statements carried.
pub(crate) async fn print_step_means(who: &str, url: &str) {
    let text = match verimail_tests::http::get(url, &[]).await {
        Ok((200, _, body)) => body,
        Ok((status, _, _)) => {
            println!("  ({who}: {url} answered {status})");
            return;
        }
        Err(e) => {
            println!("  ({who}: {url}: {e})");
            return;
        }
    };
    print_means(who, url, &text);
}

/// [`print_step_means`] on a page already read (`source` names where from).
pub(crate) fn print_means(who: &str, source: &str, text: &str) {
    let mut sums: BTreeMap<(String, &str), f64> = BTreeMap::new();
    let mut counts: BTreeMap<(String, &str), f64> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let labels = labels.trim_end_matches('}');
        // Durations in ms; batch sizes (`*_size`) in jobs: PostgreSQL's CPU
        // per mail falls as the batches grow (docs/performance.md).
        let series = |base: &str, unit: &'static str| (format!("{base}{{{labels}}}"), unit);
        if let Some(base) = name.strip_suffix("_seconds_sum") {
            sums.insert(series(base, "ms"), value * 1e3);
        } else if let Some(base) = name.strip_suffix("_seconds_count") {
            counts.insert(series(base, "ms"), value);
        } else if let Some(base) = name.strip_suffix("_size_sum") {
            sums.insert(series(base, "jobs"), value);
        } else if let Some(base) = name.strip_suffix("_size_count") {
            counts.insert(series(base, "jobs"), value);
        }
    }
    let means: Vec<String> = sums
        .iter()
        .filter_map(|((k, unit), sum)| {
            let n = *counts.get(&(k.clone(), *unit))?;
            (n > 0.0).then(|| format!("{k} {:.2} {unit} × {n}", sum / n))
        })
        .collect();
    if means.is_empty() {
        println!("  ({who}: no *_seconds or *_size histograms on {source})");
        return;
    }
    println!("  {who}: own timings and batch sizes (mean per event, from {source}):");
    for m in means {
        println!("    {m}");
    }
}

/// CPU ticks of the servers a run loads, summed by who used them: the
/// PostgreSQL backends serving one database (their command line names it),
/// PostgreSQL's own background processes (WAL writer, checkpointer, ...:
/// shared by every database, so other work on the machine shows in them
/// too), and RabbitMQ (`beam.smp`, likewise shared).
#[derive(Debug, Clone, Default)]
pub(crate) struct ServerCpu {
    /// pid → (who, ticks so far).
    seen: BTreeMap<u32, (Server, u64)>,
}

/// Whose CPU a [`ServerCpu`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Server {
    /// Backends (and autovacuum workers) of the run's database.
    PostgresBackends,
    /// The postmaster and background processes of the server.
    PostgresBackground,
    /// The broker.
    Rabbitmq,
}

impl ServerCpu {
    /// The CPU used so far by every process of the servers, `database`'s
    /// backends picked out from the other databases'.
    pub(crate) fn snapshot(database: &str) -> Self {
        let mut seen = BTreeMap::new();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Self { seen };
        };
        for entry in dir.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) else {
                continue;
            };
            let who = match comm.trim() {
                "beam.smp" => Server::Rabbitmq,
                "postgres" => {
                    // "postgres: USER DATABASE HOST(PORT) STATE" for a backend,
                    // "postgres: walwriter" for a background process.
                    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    let cmdline = String::from_utf8_lossy(&cmdline);
                    if cmdline.split_whitespace().any(|w| w == database) {
                        Server::PostgresBackends
                    } else if cmdline.contains('(') {
                        // Another database's backend: someone else's work.
                        continue;
                    } else {
                        Server::PostgresBackground
                    }
                }
                _ => continue,
            };
            if let Some(ticks) = cpu_ticks(pid) {
                seen.insert(pid, (who, ticks));
            }
        }
        Self { seen }
    }

    /// Milliseconds of CPU `who` used between `self` and `later` (a process
    /// started meanwhile counts from zero; one that ended is missed).
    pub(crate) fn ms_since(&self, later: &Self, who: &[Server]) -> f64 {
        let ticks: u64 = later
            .seen
            .iter()
            .filter(|(_, (w, _))| who.contains(w))
            .map(|(pid, (_, t))| {
                let before = self.seen.get(pid).map_or(0, |(_, b)| *b);
                t.saturating_sub(before)
            })
            .sum();
        ticks as f64 * tick_ms()
    }
}

/// CPU ticks used so far by this process's threads that match `pick` (by
/// thread id and name), from /proc/self/task.
pub(crate) fn own_threads_ticks(pick: impl Fn(u32, &str) -> bool) -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|tid| {
            let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).ok()?;
            if !pick(tid, comm.trim()) {
                return None;
            }
            let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
            let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
            let utime: u64 = fields.next()?.parse().ok()?;
            let stime: u64 = fields.next()?.parse().ok()?;
            Some(utime + stime)
        })
        .sum()
}
