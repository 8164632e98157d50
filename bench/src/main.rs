//! `verimail-bench`: the measurements behind `bench/run.sh`.
//!
//! Each subcommand sets up its own namespace (and database when a binary needs
//! one), prints its figures as it goes, appends them as `key value` lines to
//! the results file (`--results` / `BENCH_RESULTS`) and removes what it created.
//! `report` turns that file into the final table with ratios and targets.
//!
//! The release binaries it starts (`verimail-worker`, `verimail-gateway`) are
//! looked up next to this executable: build them with the same profile.

mod broker;
mod ceiling;
mod codes;
mod gateway;
mod http_load;
mod latency;
mod report;
mod results;
mod sink;
mod store;
mod system;
mod tap;
mod worker;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use verimail_shared::bus::Topology;
use verimail_tests::env::TestEnv;

use crate::broker::*;
use crate::ceiling::*;
use crate::codes::*;
use crate::gateway::*;
use crate::http_load::*;
use crate::latency::*;
use crate::report::*;
use crate::results::*;
use crate::store::*;
use crate::system::*;
use crate::tap::*;
use crate::worker::*;
use clap::{Parser, Subcommand};

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
        /// Suppression-list sizes, one run each per process count: entries
        /// loaded (addresses none of the requests use) before the workers
        /// start, so the claim's lookup runs against a list that size
        /// (`--suppressions 0,100000` compares both in one run; keys of a
        /// non-empty list get `_supp{N}` after the label).
        #[arg(long, value_delimiter = ',', default_values_t = [0])]
        suppressions: Vec<usize>,
    },
    /// PostgreSQL's CPU per request for the worker's statements alone (claim,
    /// conclusion, published mark through the worker's batching), no broker,
    /// no SMTP: the figure to compare SQL changes by.
    Store {
        /// Requests.
        #[arg(long, env = "BENCH_N", default_value_t = 40_000)]
        n: usize,
        /// Requests in flight, as the worker's WORKER_CONCURRENCY.
        #[arg(long, env = "BENCH_CONCURRENCY", default_value_t = usize::from(TUNED_CONCURRENCY))]
        concurrency: usize,
    },
    /// verimail-worker throughput through the generic `http://` API target
    /// (signed JSON over pooled keep-alive connections) into a stand-in that
    /// answers 200 at once, one worker process.
    Http {
        /// Requests preloaded.
        #[arg(long, env = "BENCH_N", default_value_t = 20_000)]
        n: usize,
        /// WORKER_CONCURRENCY.
        #[arg(long, env = "BENCH_CONCURRENCY", default_value_t = TUNED_CONCURRENCY)]
        concurrency: u16,
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
    /// verimail-gateway `POST /v1/codes/verify` per second under wrk with right,
    /// fresh codes (each used once while they last).
    Codes {
        /// Sent requests with codes written first.
        #[arg(long, env = "BENCH_CODES", default_value_t = 150_000)]
        n: usize,
        /// The wrk script (bench/codes.lua).
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
    /// An SMTP server that accepts and discards every mail, offering
    /// PIPELINING and CHUNKING (BDAT), which Postfix's smtp-sink lacks.
    SmtpSink {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:2526")]
        listen: String,
        /// Offer PIPELINING only: clients use DATA, as with smtp-sink.
        #[arg(long)]
        no_chunking: bool,
    },
    /// Print the final table from the results file.
    Report,
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
            suppressions,
        } => {
            for p in processes {
                let mut runs = Vec::new();
                for &s in &suppressions {
                    let label = if s == 0 {
                        label.clone()
                    } else {
                        format!("{label}_supp{s}")
                    };
                    let figures = worker_run(&out, &label, n, p, &mail_url, concurrency, s).await?;
                    runs.push((s, figures));
                }
                if suppressions.len() > 1 {
                    compare_suppressions(&out, &label, p, &runs)?;
                }
            }
            Ok(())
        }
        Cmd::Store { n, concurrency } => store(&out, n, concurrency).await,
        Cmd::Http { n, concurrency } => {
            let sink = verimail_tests::api::ApiSink::accepting().await?;
            let mail_url = format!("{}/mail", sink.base());
            println!("== HTTP API delivery (generic target, a stand-in answering at once)");
            worker_run(&out, "http", n, 1, &mail_url, concurrency, 0).await?;
            println!("  the stand-in received {} requests", sink.count());
            Ok(())
        }
        Cmd::Latency {
            rates,
            seconds,
            mail_url,
            concurrency,
        } => latency(&out, &rates, seconds, &mail_url, concurrency).await,
        Cmd::Gateway { tokens, lua, wrk } => gateway(&out, tokens, &lua, &wrk).await,
        Cmd::Codes { n, lua, wrk } => codes(&out, n, &lua, &wrk).await,
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
        Cmd::SmtpSink {
            listen,
            no_chunking,
        } => sink::run(&listen, !no_chunking).await,
        Cmd::Report => report(&out),
    }
}
