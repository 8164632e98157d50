//! `verimail-bench`: the measurements behind `bench/run.sh`.
//!
//! Each subcommand sets up its own namespace (and database when a binary needs
//! one), prints its figures as it goes, appends them as `key value` lines to
//! the results file (`--results` / `BENCH_RESULTS`) and removes what it created.
//! `report` turns that file into the final table with ratios and targets.
//!
//! The release binaries it starts (`verimail-worker`, `verimail-gateway`) are
//! looked up next to this executable: build them with the same profile.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use verimail_shared::bus::Topology;
use verimail_shared::events::{
    CONTENT_TYPE, EMAIL_VERIFIED, VERIFICATION_FAILED, VERIFICATION_REQUESTED, VERIFICATION_SENT,
    VERIFICATION_THROTTLED,
};
use verimail_shared::token::{Claims, Signer};
use verimail_tests::env::{TestEnv, free_port};
use verimail_tests::procs::{Proc, wait_http_ok};

/// Measures verimail against the broker's ceiling and the in-app reference.
#[derive(Debug, Parser)]
#[command(name = "verimail-bench", version, about)]
struct Cli {
    /// File the figures are appended to as `key value` lines (read by `report`).
    #[arg(long, env = "BENCH_RESULTS", global = true)]
    results: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Broker-only ceiling: consume a preloaded quorum queue (prefetch 256), publish one
    /// small outcome per message with confirms (persistent, mandatory), ack after the confirm.
    Ceiling {
        /// Messages preloaded and drained.
        #[arg(long, env = "BENCH_N", default_value_t = 20_000)]
        n: usize,
        /// Prefetch: the worker's WORKER_CONCURRENCY, so both are compared at one setting.
        #[arg(long, env = "BENCH_CONCURRENCY", default_value_t = TUNED_CONCURRENCY)]
        prefetch: u16,
    },
    /// verimail-worker throughput: preload N requests, start P worker processes, time
    /// until N outcomes were seen; once per process count.
    Worker {
        /// Requests preloaded per run.
        #[arg(long, env = "BENCH_N", default_value_t = 20_000)]
        n: usize,
        /// Process counts, one run each.
        #[arg(long, value_delimiter = ',', default_values_t = [1, 2, 4])]
        processes: Vec<usize>,
        /// MAIL_URL of the workers (the smtp-sink).
        #[arg(
            long,
            env = "BENCH_MAIL_URL",
            default_value = "smtp+plain://127.0.0.1:2525"
        )]
        mail_url: String,
        /// WORKER_CONCURRENCY.
        #[arg(long, env = "BENCH_CONCURRENCY", default_value_t = TUNED_CONCURRENCY)]
        concurrency: u16,
        /// Prefix of the figures' keys in the results (`worker_1_mps`, ...).
        #[arg(long, default_value = "worker")]
        label: String,
    },
    /// Publish→SMTP-acceptance latency (data.sent_at − publish time) at fixed offered rates,
    /// one worker process.
    Latency {
        /// Offered rates, requests per second.
        #[arg(long, value_delimiter = ',', default_values_t = [200, 500, 1000])]
        rates: Vec<u32>,
        /// Seconds per rate.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// MAIL_URL of the worker.
        #[arg(
            long,
            env = "BENCH_MAIL_URL",
            default_value = "smtp+plain://127.0.0.1:2525"
        )]
        mail_url: String,
        /// WORKER_CONCURRENCY.
        #[arg(long, env = "BENCH_CONCURRENCY", default_value_t = TUNED_CONCURRENCY)]
        concurrency: u16,
    },
    /// verimail-gateway confirms/s under wrk with fresh v1 tokens (unknown request ids).
    Gateway {
        /// Tokens minted (each used once while they last).
        #[arg(long, env = "BENCH_TOKENS", default_value_t = 150_000)]
        tokens: usize,
        /// The wrk script (bench/reference/confirm.lua).
        #[arg(long)]
        lua: PathBuf,
        #[command(flatten)]
        wrk: WrkArgs,
    },
    /// wrk against any `/confirm/<token>` server (the reference), with RSS of a process tree.
    HttpLoad {
        /// Key prefix of the results (`ref_confirm`).
        #[arg(long)]
        label: String,
        /// Base URL (`http://127.0.0.1:8081`).
        #[arg(long)]
        url: String,
        /// Token file, one a line.
        #[arg(long)]
        tokens: PathBuf,
        /// The wrk script (bench/reference/confirm.lua).
        #[arg(long)]
        lua: PathBuf,
        /// Process whose RSS, with its children's, is reported (gunicorn's master).
        #[arg(long)]
        rss_tree: Option<u32>,
        #[command(flatten)]
        wrk: WrkArgs,
    },
    /// Preload N requests (distinct users) into `{ns}.worker`, declaring the topology first.
    Preload {
        /// The namespace.
        #[arg(long)]
        ns: String,
        /// How many.
        #[arg(long, env = "BENCH_N", default_value_t = 20_000)]
        n: usize,
    },
    /// Bind a counting queue to `{ns}`, print `ready`, wait for N outcome events and print
    /// the time from `ready` to the N-th (start the workers after `ready`).
    DrainWait {
        /// The namespace.
        #[arg(long)]
        ns: String,
        /// How many outcomes.
        #[arg(long, env = "BENCH_N", default_value_t = 20_000)]
        n: usize,
    },
    /// Mint N fresh valid v1 tokens (distinct request ids) into a file.
    MintTokens {
        /// How many.
        #[arg(long, env = "BENCH_N", default_value_t = 20_000)]
        n: usize,
        /// The secret (VERIMAIL_SECRET_KEY of the gateway).
        #[arg(long, env = "VERIMAIL_SECRET_KEY")]
        secret: String,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Append one `key value` line to the results file (figures measured by scripts).
    Record {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// Delete queues and exchanges (the reference's, at the end of a run).
    DeleteAmqp {
        /// Queues.
        #[arg(long)]
        queue: Vec<String>,
        /// Exchanges.
        #[arg(long)]
        exchange: Vec<String>,
    },
    /// Print the final table from the results file.
    Report,
}

#[derive(Debug, Clone, clap::Args)]
struct WrkArgs {
    /// wrk threads.
    #[arg(long, default_value_t = 2)]
    threads: u32,
    /// wrk connections.
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// Seconds.
    #[arg(long, default_value_t = 10)]
    duration: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let out = Results {
        path: cli.results.clone(),
    };
    match cli.cmd {
        Cmd::Ceiling { n, prefetch } => ceiling(&out, n, prefetch).await,
        Cmd::Worker {
            n,
            processes,
            mail_url,
            concurrency,
            label,
        } => {
            for p in processes {
                worker_run(&out, &label, n, p, &mail_url, concurrency).await?;
            }
            Ok(())
        }
        Cmd::Latency {
            rates,
            seconds,
            mail_url,
            concurrency,
        } => latency(&out, &rates, seconds, &mail_url, concurrency).await,
        Cmd::Gateway { tokens, lua, wrk } => gateway(&out, tokens, &lua, &wrk).await,
        Cmd::HttpLoad {
            label,
            url,
            tokens,
            lua,
            rss_tree,
            wrk,
        } => {
            let tree = rss_tree.map(|pid| move || process_tree(pid));
            let load = run_wrk(&url, &tokens, &lua, &wrk, "round").await?;
            load.record(&out, &label)?;
            if let Some(tree) = tree {
                let pids = tree();
                let rss: u64 = pids.iter().filter_map(|p| status_kib(*p, "VmRSS")).sum();
                let hwm: u64 = pids.iter().filter_map(|p| status_kib(*p, "VmHWM")).sum();
                println!(
                    "{label}: RSS of {} processes after the load: {} (sum of peaks {})",
                    pids.len(),
                    mib(rss),
                    mib(hwm)
                );
                out.put(&format!("{label}_rss_kib"), rss)?;
                out.put(&format!("{label}_hwm_kib"), hwm)?;
            }
            Ok(())
        }
        Cmd::Preload { ns, n } => {
            let conn = amqp(&default_amqp_url()).await?;
            let topology = Topology::new(ns);
            verimail_shared::bus::declare(&conn.create_channel().await?, &topology).await?;
            let stats = preload(&conn, &topology, n, &unique_prefix()).await?;
            println!(
                "preload: {n} requests in {:.2} s ({:.0}/s)",
                stats.0, stats.1
            );
            Ok(())
        }
        Cmd::DrainWait { ns, n } => {
            let conn = amqp(&default_amqp_url()).await?;
            let topology = Topology::new(ns);
            verimail_shared::bus::declare(&conn.create_channel().await?, &topology).await?;
            let tap = Tap::start(&conn, topology.exchange(), OUTCOMES, false).await?;
            println!("ready");
            let t0 = Instant::now();
            let seen = tap.wait(n, Duration::from_secs(30)).await;
            let secs = tap.last_at().map_or(0.0, |t| (t - t0).as_secs_f64());
            println!(
                "drain-wait: {seen} outcomes ({}) in {secs:.2} s: {:.0}/s",
                tap.breakdown(),
                rate(seen, secs)
            );
            Ok(())
        }
        Cmd::MintTokens {
            n,
            secret,
            out: file,
        } => {
            let mut env = TestEnv::new("mint");
            env.set("VERIMAIL_SECRET_KEY", secret);
            let secs = mint_tokens(&env, n, &file)?;
            println!(
                "mint-tokens: {n} v1 tokens in {secs:.2} s into {}",
                file.display()
            );
            Ok(())
        }
        Cmd::Record { key, value } => out.put(&key, value),
        Cmd::DeleteAmqp { queue, exchange } => {
            let conn = amqp(&default_amqp_url()).await?;
            let ch = conn.create_channel().await?;
            for q in queue {
                let _ = ch
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            for e in exchange {
                let _ = ch
                    .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
            }
            let _ = conn.close(200, "done".into()).await;
            Ok(())
        }
        Cmd::Report => report(&out),
    }
}

// ---------------------------------------------------------------------------
// Results file
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct Results {
    path: Option<PathBuf>,
}

impl Results {
    fn put(&self, key: &str, value: impl std::fmt::Display) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("results file {}", path.display()))?;
        writeln!(f, "{key} {value}")?;
        Ok(())
    }

    fn load(&self) -> Result<BTreeMap<String, String>> {
        let path = self
            .path
            .as_ref()
            .context("report needs --results or BENCH_RESULTS")?;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("results file {}", path.display()))?;
        // Later lines win: a figure re-measured in the same run replaces the first.
        Ok(text
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
            .collect())
    }
}

// ---------------------------------------------------------------------------
// Broker helpers
// ---------------------------------------------------------------------------

fn default_amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

async fn amqp(url: &str) -> Result<Connection> {
    Connection::connect(
        url,
        ConnectionProperties::default().with_connection_name("verimail-bench".into()),
    )
    .await
    .context("cannot connect to RabbitMQ")
}

fn unique_prefix() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("b{}", &id[..8])
}

fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// A `verimail.verification.requested` CloudEvent for user `user`.
fn request_body(id: &str, user: &str, context: Option<Value>) -> Vec<u8> {
    let mut data = json!({
        "user_id": user,
        "email": format!("{user}@example.com"),
        "name": format!("User {user}"),
    });
    if let Some(context) = context {
        data["context"] = context;
    }
    let event = json!({
        "specversion": "1.0",
        "id": id,
        "source": "/bench",
        "type": VERIFICATION_REQUESTED,
        "time": now_rfc3339(),
        "datacontenttype": "application/json",
        "data": data,
    });
    serde_json::to_vec(&event).unwrap_or_default()
}

fn event_props(id: &str, ty: &str) -> BasicProperties {
    BasicProperties::default()
        .with_content_type(CONTENT_TYPE.into())
        .with_delivery_mode(2)
        .with_message_id(id.into())
        .with_type(ty.into())
}

/// WORKER_CONCURRENCY of the throughput and latency runs, and the ceiling's
/// prefetch. At the contract's default (64) a worker is latency-bound on this
/// machine (each prefetch slot turns over in about 15 ms: 11-12 ms from
/// delivery to ack, then the broker's round trip for the next delivery; so
/// about 4,000 mails/s by Little's law, with the CPU not saturated); at 256
/// the database batches grow and the machine's CPU becomes the limit. The
/// default is measured too (`worker_default`).
const TUNED_CONCURRENCY: u16 = 256;

/// The outcome types (a `verimail.verification.*` binding would also catch the requests).
const OUTCOMES: &[&str] = &[
    VERIFICATION_SENT,
    VERIFICATION_THROTTLED,
    VERIFICATION_FAILED,
];

const MANDATORY: BasicPublishOptions = BasicPublishOptions {
    mandatory: true,
    immediate: false,
};

/// Publishes N requests with confirms, keeping up to 1,000 unconfirmed in
/// flight; fails on any nack or return. Returns (seconds, per second).
async fn preload(
    conn: &Connection,
    topology: &Topology,
    n: usize,
    prefix: &str,
) -> Result<(f64, f64)> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let started = Instant::now();
    let mut pending = std::collections::VecDeque::new();
    for i in 0..n {
        let id = uuid::Uuid::now_v7().to_string();
        let body = request_body(&id, &format!("{prefix}-{i}"), None);
        let confirm = ch
            .basic_publish(
                topology.exchange().into(),
                VERIFICATION_REQUESTED.into(),
                MANDATORY,
                &body,
                event_props(&id, VERIFICATION_REQUESTED),
            )
            .await?;
        pending.push_back(confirm);
        if pending.len() >= 1_000
            && let Some(c) = pending.pop_front()
        {
            check_confirm(c.await?)?;
        }
    }
    while let Some(c) = pending.pop_front() {
        check_confirm(c.await?)?;
    }
    let secs = started.elapsed().as_secs_f64();
    let _ = ch.close(200, "preloaded".into()).await;
    Ok((secs, rate(n, secs)))
}

fn check_confirm(c: lapin::Confirmation) -> Result<()> {
    if c.is_nack() {
        bail!("the broker nacked a publish");
    }
    if c.take_message().is_some() {
        bail!("a publish was returned unroutable (is the queue bound?)");
    }
    Ok(())
}

/// Outcome events of a namespace, counted (and timed, for latency) as they arrive
/// on an exclusive queue bound to `{ns}`; consumed without acks, so the tap
/// costs the broker as little as possible.
#[derive(Debug, Clone)]
struct Tap {
    state: Arc<TapState>,
}

#[derive(Debug, Default)]
struct TapState {
    sent: AtomicU64,
    throttled: AtomicU64,
    failed: AtomicU64,
    verified: AtomicU64,
    other: AtomicU64,
    /// Events whose id was seen before (at-least-once re-sends); not counted above.
    duplicates: AtomicU64,
    ids: Mutex<std::collections::HashSet<String>>,
    first_at: Mutex<Option<Instant>>,
    last_at: Mutex<Option<Instant>>,
    samples: Mutex<Vec<Sample>>,
    failures: Mutex<Vec<String>>,
}

/// One `sent` outcome of the latency run.
#[derive(Debug, Clone)]
struct Sample {
    phase: String,
    /// data.sent_at − the publish time stamped in data.context, ms.
    to_sent_ms: f64,
    /// Arrival at the tap − the publish time, ms.
    to_arrival_ms: f64,
}

impl Tap {
    async fn start(
        conn: &Connection,
        exchange: &str,
        patterns: &[&str],
        parse: bool,
    ) -> Result<Self> {
        let ch = conn.create_channel().await?;
        let queue = verimail_shared::bus::bind_temporary_queue(&ch, exchange, patterns).await?;
        let mut consumer = ch
            .basic_consume(
                queue,
                "bench-tap".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let state = Arc::new(TapState::default());
        let sink = state.clone();
        tokio::spawn(async move {
            // Keeps the channel open as long as the task runs.
            let _ch = ch;
            while let Some(Ok(delivery)) = consumer.next().await {
                let now = Instant::now();
                let id = delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|m| m.as_str().to_owned())
                    .unwrap_or_default();
                let fresh = sink
                    .ids
                    .lock()
                    .map(|mut ids| ids.insert(id))
                    .unwrap_or(true);
                if !fresh {
                    sink.duplicates.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let counter = match delivery.routing_key.as_str() {
                    VERIFICATION_SENT => &sink.sent,
                    VERIFICATION_THROTTLED => &sink.throttled,
                    VERIFICATION_FAILED => &sink.failed,
                    EMAIL_VERIFIED => &sink.verified,
                    _ => &sink.other,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut first) = sink.first_at.lock() {
                    first.get_or_insert(now);
                }
                if let Ok(mut last) = sink.last_at.lock() {
                    *last = Some(now);
                }
                if delivery.routing_key.as_str() == VERIFICATION_FAILED
                    && let Ok(mut f) = sink.failures.lock()
                    && f.len() < 5
                {
                    f.push(String::from_utf8_lossy(&delivery.data).into_owned());
                }
                if parse && delivery.routing_key.as_str() == VERIFICATION_SENT {
                    let arrived = OffsetDateTime::now_utc();
                    if let Some(sample) = sample_of(&delivery.data, arrived)
                        && let Ok(mut s) = sink.samples.lock()
                    {
                        s.push(sample);
                    }
                }
            }
        });
        Ok(Self { state })
    }

    fn total(&self) -> u64 {
        let s = &self.state;
        s.sent.load(Ordering::Relaxed)
            + s.throttled.load(Ordering::Relaxed)
            + s.failed.load(Ordering::Relaxed)
            + s.verified.load(Ordering::Relaxed)
            + s.other.load(Ordering::Relaxed)
    }

    fn sent(&self) -> u64 {
        self.state.sent.load(Ordering::Relaxed)
    }

    fn breakdown(&self) -> String {
        let s = &self.state;
        format!(
            "sent {}, throttled {}, failed {}, verified {}, other {}, duplicate ids {}",
            s.sent.load(Ordering::Relaxed),
            s.throttled.load(Ordering::Relaxed),
            s.failed.load(Ordering::Relaxed),
            s.verified.load(Ordering::Relaxed),
            s.other.load(Ordering::Relaxed),
            s.duplicates.load(Ordering::Relaxed)
        )
    }

    fn first_at(&self) -> Option<Instant> {
        self.state.first_at.lock().ok().and_then(|g| *g)
    }

    fn last_at(&self) -> Option<Instant> {
        self.state.last_at.lock().ok().and_then(|g| *g)
    }

    fn failures(&self) -> Vec<String> {
        self.state
            .failures
            .lock()
            .map(|f| f.clone())
            .unwrap_or_default()
    }

    fn samples(&self, phase: &str) -> Vec<Sample> {
        self.state
            .samples
            .lock()
            .map(|s| s.iter().filter(|x| x.phase == phase).cloned().collect())
            .unwrap_or_default()
    }

    /// Waits until `n` events arrived; gives up when none arrived for `stall`.
    /// Returns how many arrived.
    async fn wait(&self, n: usize, stall: Duration) -> usize {
        self.wait_with(n, stall, || true).await
    }

    /// Like [`Tap::wait`], also giving up as soon as `alive` says no.
    async fn wait_with(&self, n: usize, stall: Duration, mut alive: impl FnMut() -> bool) -> usize {
        let mut seen = self.total();
        let mut progress = Instant::now();
        let mut last_print = Instant::now();
        loop {
            let now = self.total();
            if now >= n as u64 {
                return usize::try_from(now).unwrap_or(usize::MAX);
            }
            if now != seen {
                seen = now;
                progress = Instant::now();
            }
            if progress.elapsed() >= stall || !alive() {
                return usize::try_from(now).unwrap_or(usize::MAX);
            }
            if last_print.elapsed() >= Duration::from_secs(5) {
                println!("    … {now}/{n} outcomes");
                last_print = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn sample_of(body: &[u8], arrived: OffsetDateTime) -> Option<Sample> {
    let event: Value = serde_json::from_slice(body).ok()?;
    let data = &event["data"];
    let context = &data["context"];
    let published = parse_time(context["bench_published_at"].as_str()?)?;
    let sent = parse_time(data["sent_at"].as_str()?)?;
    Some(Sample {
        phase: context["bench_phase"].as_str()?.to_owned(),
        to_sent_ms: (sent - published).as_seconds_f64() * 1e3,
        to_arrival_ms: (arrived - published).as_seconds_f64() * 1e3,
    })
}

fn parse_time(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).ok()
}

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// A field of /proc/PID/status in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// `pid` and its direct children (gunicorn's master and workers).
fn process_tree(pid: u32) -> Vec<u32> {
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
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Milliseconds per clock tick (`getconf CLK_TCK`, usually 100 a second).
fn tick_ms() -> f64 {
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
fn machine_ticks() -> (u64, u64) {
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
fn busy_percent(before: (u64, u64), after: (u64, u64)) -> f64 {
    let busy = after.0.saturating_sub(before.0) as f64;
    let total = after.1.saturating_sub(before.1) as f64;
    if total > 0.0 {
        busy / total * 100.0
    } else {
        0.0
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn rate(n: usize, secs: f64) -> f64 {
    if secs > 0.0 { n as f64 / secs } else { 0.0 }
}

/// A deployment for the benchmark: quiet JSON logs, the sink as mail server.
fn bench_env(label: &str, mail_url: &str, concurrency: u16) -> TestEnv {
    let mut env = TestEnv::new(label);
    env.set("MAIL_URL", mail_url);
    env.set("WORKER_CONCURRENCY", concurrency.to_string());
    env.set("LOG_FORMAT", "json");
    env.set("RUST_LOG", "warn");
    env
}

/// Creates the database and applies the migrations before any timed start,
/// as a deployment's database already exists.
async fn prepare_db(env: &TestEnv) -> Result<()> {
    let url = env.get("DATABASE_URL").context("DATABASE_URL")?;
    let pool =
        verimail_shared::db::connect(url, true, verimail_shared::db::PoolSettings::default())
            .await?;
    pool.close().await;
    Ok(())
}

fn log_tail(p: &Proc, lines: usize) -> String {
    let log = p.log();
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Prints the mean of every `*_seconds` histogram series on a Prometheus
/// `/metrics` page (sum / count): where a service says its time goes.
async fn print_step_means(who: &str, url: &str) {
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
    let mut sums: BTreeMap<String, f64> = BTreeMap::new();
    let mut counts: BTreeMap<String, f64> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let labels = labels.trim_end_matches('}');
        if let Some(base) = name.strip_suffix("_seconds_sum") {
            sums.insert(format!("{base}{{{labels}}}"), value);
        } else if let Some(base) = name.strip_suffix("_seconds_count") {
            counts.insert(format!("{base}{{{labels}}}"), value);
        }
    }
    let means: Vec<String> = sums
        .iter()
        .filter_map(|(k, sum)| {
            let n = *counts.get(k)?;
            (n > 0.0).then(|| format!("{k} {:.2} ms × {n}", sum / n * 1e3))
        })
        .collect();
    if means.is_empty() {
        println!("  ({who}: no *_seconds histograms on {url})");
        return;
    }
    println!("  {who}'s own timings (mean per event, from /metrics):");
    for m in means {
        println!("    {m}");
    }
}

// ---------------------------------------------------------------------------
// 1. Broker-only ceiling
// ---------------------------------------------------------------------------

async fn ceiling(out: &Results, n: usize, prefetch: u16) -> Result<()> {
    let env = TestEnv::new("bceil");
    let result = ceiling_in(&env, out, n, prefetch).await;
    env.cleanup().await;
    result
}

async fn ceiling_in(env: &TestEnv, out: &Results, n: usize, prefetch: u16) -> Result<()> {
    let url = env.get("AMQP_URL").context("AMQP_URL")?.to_owned();
    let topology = Topology::new(env.namespace.clone());
    let setup = amqp(&url).await?;
    verimail_shared::bus::declare(&setup.create_channel().await?, &topology).await?;
    let tap = Tap::start(&setup, topology.exchange(), OUTCOMES, false).await?;
    let (secs, per_s) = preload(&setup, &topology, n, &unique_prefix()).await?;
    println!("  preloaded {n} requests in {secs:.2} s ({per_s:.0}/s)");

    // The consumer side, on its own connection as a worker process would be:
    // one channel consuming, one confirm channel publishing the outcomes.
    let t0 = Instant::now();
    let machine0 = machine_ticks();
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
    let errors = Arc::new(AtomicU64::new(0));
    let exchange = topology.exchange().to_owned();
    let errs = errors.clone();
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
    let seen = tap.wait(n, Duration::from_secs(20)).await;
    let end = tap.last_at().unwrap_or_else(Instant::now);
    let secs = (end - t0).as_secs_f64();
    pump.abort();
    let _ = conn.close(200, "done".into()).await;
    let _ = setup.close(200, "done".into()).await;
    if seen < n {
        bail!(
            "ceiling: only {seen} of {n} outcomes arrived ({} publish errors)",
            errors.load(Ordering::Relaxed)
        );
    }
    let per_s = rate(n, secs);
    println!(
        "  ceiling: {n} messages in {secs:.2} s: {per_s:.0} msg/s (machine CPU busy {:.0} %)",
        busy_percent(machine0, machine_ticks())
    );
    out.put("ceiling_n", n)?;
    out.put("ceiling_prefetch", prefetch)?;
    out.put("ceiling_mps", format!("{per_s:.0}"))?;
    Ok(())
}

// ---------------------------------------------------------------------------
// 2. Worker throughput
// ---------------------------------------------------------------------------

async fn worker_run(
    out: &Results,
    label: &str,
    n: usize,
    processes: usize,
    mail_url: &str,
    concurrency: u16,
) -> Result<()> {
    let env = bench_env(&format!("bw{processes}"), mail_url, concurrency);
    let result = worker_run_in(&env, out, label, n, processes, concurrency).await;
    env.cleanup().await;
    result
}

async fn worker_run_in(
    env: &TestEnv,
    out: &Results,
    label: &str,
    n: usize,
    processes: usize,
    concurrency: u16,
) -> Result<()> {
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
    println!(
        "  {processes} worker(s): {n} outcomes ({}) in {secs:.2} s from process start: {per_s:.0} mails/s \
         (first→last outcome: {steady:.0}/s)",
        tap.breakdown()
    );
    println!(
        "  CPU: workers used {:.0} ms in all, {:.3} ms per outcome; machine CPU busy {:.0} % \
         (2 cores shared with RabbitMQ, PostgreSQL, the sink and this tap)",
        cpu_ms,
        cpu_ms / n as f64,
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
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

// ---------------------------------------------------------------------------
// 3. Latency at fixed offered rates
// ---------------------------------------------------------------------------

async fn latency(
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

async fn latency_in(env: &TestEnv, out: &Results, rates: &[u32], seconds: u64) -> Result<()> {
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
async fn offer(
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
fn percentiles(v: &mut [f64]) -> (f64, f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    (at(0.50), at(0.99), v[v.len() - 1])
}

// ---------------------------------------------------------------------------
// 4. Gateway
// ---------------------------------------------------------------------------

fn mint_tokens(env: &TestEnv, n: usize, file: &Path) -> Result<f64> {
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

async fn gateway(out: &Results, tokens: usize, lua: &Path, wrk: &WrkArgs) -> Result<()> {
    let mut env = TestEnv::new("bgw");
    env.set("CONFIRM_RATE_LIMIT_PER_MINUTE", "100000000");
    env.set("LOG_FORMAT", "json");
    env.set("RUST_LOG", "warn");
    let file = std::env::temp_dir().join(format!("{}-tokens.txt", env.namespace));
    let result = gateway_in(&env, out, tokens, lua, wrk, &file).await;
    let _ = std::fs::remove_file(&file);
    env.cleanup().await;
    result
}

async fn gateway_in(
    env: &TestEnv,
    out: &Results,
    tokens: usize,
    lua: &Path,
    wrk: &WrkArgs,
    file: &Path,
) -> Result<()> {
    let url = env.get("AMQP_URL").context("AMQP_URL")?.to_owned();
    let topology = Topology::new(env.namespace.clone());
    prepare_db(env).await?;
    let conn = amqp(&url).await?;
    verimail_shared::bus::declare(&conn.create_channel().await?, &topology).await?;
    // A subscriber, so the outbox relay's mandatory publishes are routable (and counted).
    let tap = Tap::start(&conn, topology.exchange(), &[EMAIL_VERIFIED], false).await?;
    let secs = mint_tokens(env, tokens + 1, file)?;
    println!("  minted {} v1 tokens in {secs:.2} s", tokens + 1);
    // The last token is the probe; wrk reads the file as is (the probe is then `already`).
    let probe = std::fs::read_to_string(file)?
        .lines()
        .last()
        .unwrap_or_default()
        .to_owned();

    let mut gw = Proc::start("verimail-gateway", &[], env);
    let base = env.gateway_url();
    if !wait_http_ok(&format!("{base}/readyz"), Duration::from_secs(30)).await {
        println!("--- gateway log (tail) ---\n{}", log_tail(&gw, 20));
        gw.stop(Duration::from_secs(10)).await;
        bail!("the gateway did not become ready at {base}/readyz");
    }
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
    print_step_means("gateway", &format!("{base}/metrics")).await;
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

/// What wrk reported.
#[derive(Debug, Default)]
struct Load {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: u64,
    ok: u64,
    already: u64,
    other: u64,
    socket_errors: String,
}

impl Load {
    fn record(&self, out: &Results, label: &str) -> Result<()> {
        println!(
            "  {label}: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms; {} requests: {} confirmed, {} already, {} other{}",
            self.rps,
            self.p50_ms,
            self.p99_ms,
            self.requests,
            self.ok,
            self.already,
            self.other,
            if self.socket_errors.is_empty() {
                String::new()
            } else {
                format!("; {}", self.socket_errors)
            }
        );
        out.put(&format!("{label}_rps"), format!("{:.0}", self.rps))?;
        out.put(&format!("{label}_p50_ms"), format!("{:.2}", self.p50_ms))?;
        out.put(&format!("{label}_p99_ms"), format!("{:.2}", self.p99_ms))?;
        out.put(&format!("{label}_ok"), self.ok)?;
        out.put(&format!("{label}_already"), self.already)?;
        out.put(&format!("{label}_other"), self.other)?;
        Ok(())
    }
}

async fn run_wrk(url: &str, tokens: &Path, lua: &Path, w: &WrkArgs, mode: &str) -> Result<Load> {
    let output = tokio::process::Command::new("wrk")
        .arg(format!("-t{}", w.threads))
        .arg(format!("-c{}", w.connections))
        .arg(format!("-d{}s", w.duration))
        .arg("--latency")
        .arg("-s")
        .arg(lua)
        .arg(url)
        .arg("--")
        .arg(tokens)
        .arg(mode)
        .arg(w.threads.to_string())
        .output()
        .await
        .context("cannot run wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    for l in text.lines() {
        println!("    | {l}");
    }
    if !output.status.success() {
        bail!(
            "wrk failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    parse_wrk(&text)
}

fn parse_wrk(text: &str) -> Result<Load> {
    let mut load = Load::default();
    for line in text.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            load.rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = line.strip_prefix("50%") {
            load.p50_ms = wrk_ms(v.trim()).unwrap_or(f64::NAN);
        } else if let Some(v) = line.strip_prefix("99%") {
            load.p99_ms = wrk_ms(v.trim()).unwrap_or(f64::NAN);
        } else if line.contains(" requests in ") {
            load.requests = line
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        } else if line.starts_with("Socket errors") {
            line.clone_into(&mut load.socket_errors);
        } else if let Some(rest) = line.strip_prefix("status 200:") {
            // "status 200: A, already: B, other: C (first other status S)"
            let nums: Vec<u64> = rest
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|s| s.parse().ok())
                .collect();
            if let [ok, already, other, ..] = nums[..] {
                load.ok = ok;
                load.already = already;
                load.other = other;
            }
        }
    }
    if load.rps == 0.0 {
        bail!("could not read wrk's Requests/sec");
    }
    Ok(load)
}

/// wrk's `1.23ms`, `456.00us`, `1.02s`, `1.50m` in milliseconds.
fn wrk_ms(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = v.split_at(split);
    let num: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => num / 1e3,
        "ms" => num,
        "s" => num * 1e3,
        "m" => num * 60e3,
        "h" => num * 3600e3,
        _ => return None,
    })
}

// ---------------------------------------------------------------------------
// 6. Report
// ---------------------------------------------------------------------------

fn report(out: &Results) -> Result<()> {
    let r = out.load()?;
    let num = |k: &str| r.get(k).and_then(|v| v.parse::<f64>().ok());
    let fmt_num = |v: Option<f64>, unit: &str| match v {
        Some(v) if v >= 100.0 => format!("{} {unit}", thousands(v)),
        Some(v) => format!("{v:.1} {unit}"),
        None => "—".into(),
    };
    let status = |ok: Option<bool>| match ok {
        Some(true) => "MET",
        Some(false) => "NOT MET",
        None => "not measured",
    };
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let mut rows: Vec<[String; 3]> = Vec::new();
    let mut row = |figure: &str, value: String, target: &str, st: &str| {
        let t = if target.is_empty() {
            String::new()
        } else {
            format!("{target} → {st}")
        };
        rows.push([figure.to_owned(), value, t]);
    };

    let ceiling = num("ceiling_mps");
    let w1 = num("worker_1_mps");
    let ref_w = num("ref_worker_mps");
    let get = |k: &str| r.get(k).map_or("?", String::as_str);
    row(
        &format!(
            "broker-only ceiling (N={}, prefetch {}, confirms)",
            get("ceiling_n"),
            get("ceiling_prefetch")
        ),
        fmt_num(ceiling, "msg/s"),
        "",
        "",
    );
    for p in [1, 2, 4] {
        let k = format!("worker_{p}");
        if let Some(v) = num(&format!("{k}_mps")) {
            let target = if p == 1 { "≥ 5,000 mails/s" } else { "" };
            row(
                &format!(
                    "verimail worker, {p} process{} (N={}, WORKER_CONCURRENCY {})",
                    if p == 1 { "" } else { "es" },
                    get(&format!("{k}_n")),
                    get(&format!("{k}_concurrency"))
                ),
                format!(
                    "{} (steady {})",
                    fmt_num(Some(v), "mails/s"),
                    fmt_num(num(&format!("{k}_steady_mps")), "/s")
                ),
                target,
                status((p == 1).then_some(v >= 5000.0)),
            );
        }
    }
    if let Some(v) = num("worker_default_1_mps") {
        row(
            &format!(
                "verimail worker, 1 process, contract default WORKER_CONCURRENCY {} (N={})",
                get("worker_default_1_concurrency"),
                get("worker_default_1_n")
            ),
            format!(
                "{} (steady {})",
                fmt_num(Some(v), "mails/s"),
                fmt_num(num("worker_default_1_steady_mps"), "/s")
            ),
            "",
            "",
        );
    }
    if w1.is_none() {
        row(
            "verimail worker, 1 process",
            "—".into(),
            "≥ 5,000 mails/s",
            status(None),
        );
    }
    row(
        &format!(
            "reference worker (N={})",
            r.get("ref_worker_n").map_or("?", String::as_str)
        ),
        fmt_num(ref_w, "mails/s"),
        "",
        "",
    );
    row(
        "ratio worker / reference worker",
        ratio(w1, ref_w).map_or("—".into(), |x| format!("{x:.1}×")),
        "",
        "",
    );
    let of_ceiling = ratio(w1, ceiling);
    row(
        "ratio worker / broker ceiling",
        of_ceiling.map_or("—".into(), |x| format!("{:.0} %", x * 100.0)),
        "≥ 40 %",
        status(of_ceiling.map(|x| x >= 0.40)),
    );
    for rate in [200, 500, 1000] {
        let p50 = num(&format!("latency_{rate}_p50_ms"));
        let p99 = num(&format!("latency_{rate}_p99_ms"));
        if p50.is_none() && rate != 1000 {
            continue;
        }
        let (target, st) = if rate == 1000 {
            ("p99 ≤ 50 ms", status(p99.map(|p| p <= 50.0)))
        } else {
            ("", "")
        };
        row(
            &format!("latency publish→sent_at @ {rate}/s, p50 / p99"),
            match (p50, p99) {
                (Some(a), Some(b)) => format!(
                    "{a:.1} / {b:.1} ms ({} of {} sent)",
                    r.get(&format!("latency_{rate}_sent"))
                        .map_or("?", String::as_str),
                    r.get(&format!("latency_{rate}_published"))
                        .map_or("?", String::as_str)
                ),
                _ => "—".into(),
            },
            target,
            st,
        );
    }
    let worker_hwm = [
        "worker_1_hwm_kib",
        "worker_2_hwm_kib",
        "worker_4_hwm_kib",
        "worker_default_1_hwm_kib",
        "latency_worker_hwm_kib",
    ]
    .iter()
    .filter_map(|k| num(k))
    .fold(None, |acc: Option<f64>, v| {
        Some(acc.map_or(v, |a| a.max(v)))
    });
    row(
        "worker RSS, 1 process: VmRSS at end / peak VmHWM (max over all runs)",
        match (num("worker_1_rss_kib"), worker_hwm) {
            (Some(a), Some(b)) => format!("{:.1} / {:.1} MiB", a / 1024.0, b / 1024.0),
            _ => "—".into(),
        },
        "≤ 100 MB",
        status(worker_hwm.map(|h| h / 1024.0 <= 100.0)),
    );
    row(
        "CPU of the process itself: worker ms per mail (1 process) / gateway ms per request",
        format!(
            "{} / {} ms",
            r.get("worker_1_cpu_ms_per_mail")
                .map_or("—", String::as_str),
            r.get("gateway_cpu_ms_per_req").map_or("—", String::as_str)
        ),
        "",
        "",
    );
    let g = num("gateway_rps");
    let g99 = num("gateway_p99_ms");
    row(
        "verimail gateway confirms/s (wrk -t2 -c32 -d10s)",
        format!(
            "{} ({} confirmed, {} already_verified, {} other)",
            fmt_num(g, "req/s"),
            r.get("gateway_ok").map_or("?", String::as_str),
            r.get("gateway_already").map_or("?", String::as_str),
            r.get("gateway_other").map_or("?", String::as_str)
        ),
        "≥ 8,000/s",
        status(g.map(|v| v >= 8000.0)),
    );
    row(
        "gateway latency p50 / p99",
        match (num("gateway_p50_ms"), g99) {
            (Some(a), Some(b)) => format!("{a:.2} / {b:.2} ms"),
            _ => "—".into(),
        },
        "p99 ≤ 20 ms",
        status(g99.map(|v| v <= 20.0)),
    );
    let g_hwm = num("gateway_hwm_kib");
    row(
        "gateway RSS after load / peak VmHWM",
        match (num("gateway_rss_kib"), g_hwm) {
            (Some(a), Some(b)) => format!("{:.1} / {:.1} MiB", a / 1024.0, b / 1024.0),
            _ => "—".into(),
        },
        "≤ 60 MB",
        status(g_hwm.map(|h| h / 1024.0 <= 60.0)),
    );
    let rc = num("ref_confirm_rps");
    row(
        "reference confirm, gunicorn -w 2 (same wrk)",
        format!(
            "{}, p50 / p99 {} / {} ms",
            fmt_num(rc, "req/s"),
            r.get("ref_confirm_p50_ms").map_or("?", String::as_str),
            r.get("ref_confirm_p99_ms").map_or("?", String::as_str)
        ),
        "",
        "",
    );
    row(
        "ratio gateway / reference confirm",
        ratio(g, rc).map_or("—".into(), |x| format!("{x:.1}×")),
        "",
        "",
    );
    row(
        "RSS: reference worker (ru_maxrss) / gunicorn master + 2 workers",
        format!(
            "{} / {}",
            num("ref_worker_rss_kib").map_or("—".into(), |v| mib(v as u64)),
            num("ref_confirm_rss_kib").map_or("—".into(), |v| mib(v as u64))
        ),
        "",
        "",
    );

    let w0 = rows.iter().map(|r| r[0].chars().count()).max().unwrap_or(0);
    let w1c = rows.iter().map(|r| r[1].chars().count()).max().unwrap_or(0);
    println!();
    println!("== verimail bench: final table");
    for k in ["date", "host", "cpu", "nproc", "load_before", "load_after"] {
        if let Some(v) = r.get(k) {
            println!("   {k}: {v}");
        }
    }
    println!();
    for [a, b, c] in &rows {
        println!(
            "  {a}{}  {b}{}  {c}",
            " ".repeat(w0 - a.chars().count()),
            " ".repeat(w1c - b.chars().count())
        );
    }
    Ok(())
}

/// 12345.6 → "12,346".
fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v);
    let mut outs = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            outs.push(',');
        }
        outs.push(c);
    }
    outs
}
