//! Before the load: the cluster up, the deployment on it (two workers on
//! different nodes where possible, the gateway), and the watchers (the tap,
//! the publisher, the clicker) running.

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use verimail_shared::bus::{Bus, Publisher, Topology, declare_subscriber};
use verimail_shared::token::Signer;
use verimail_tests::env::TestEnv;
use verimail_tests::procs::{Proc, cli, readyz_url, start_extra_worker, wait_http_ok};
use verimail_tests::smtp::SmtpServer;

use crate::support::{Clicks, Seen, click_links, cluster, connected_port, run_tap};
use crate::{TAPPED, WAIT};

/// The deployment on the cluster: its environment and the three services.
pub struct Deployment {
    pub env: TestEnv,
    pub topology: Topology,
    pub smtp: Arc<SmtpServer>,
    pub signer: Arc<Signer>,
    pub worker_a: Proc,
    /// The AMQP port of worker A's node.
    pub port_a: u16,
    pub worker_b: Proc,
    /// The AMQP port of worker B's node.
    pub port_b: u16,
    /// How many starts worker B took to land on another node than A's.
    pub b_attempts: usize,
    pub gateway: Proc,
    /// The AMQP port of the gateway's node.
    pub port_gw: Option<u16>,
}

/// The tap, the publisher and the clicker, running.
pub struct Watchers {
    /// Stops the tap and the clicker.
    pub stop: CancellationToken,
    /// Stops the buses, which outlive the tasks: the dead-letter count and the
    /// cleanup use them.
    pub bus_stop: CancellationToken,
    pub tap_bus: Arc<Bus>,
    pub tap_queue: String,
    pub seen: Arc<Mutex<Seen>>,
    pub tap_reconnects: Arc<AtomicU64>,
    pub tap: JoinHandle<()>,
    pub pub_bus: Arc<Bus>,
    pub publisher: Arc<Publisher>,
    pub clicks: Arc<Mutex<Clicks>>,
    pub pending_clicks: Arc<AtomicUsize>,
    pub clicker: JoinHandle<()>,
}

/// `rabbitmq-cluster.sh up`: the three nodes' URLs, and how long it took.
pub async fn bring_up_the_cluster() -> anyhow::Result<(Vec<String>, f64)> {
    let t_up = Instant::now();
    let urls: Vec<String> = cluster(&["up"])
        .await?
        .split(',')
        .map(str::to_owned)
        .collect();
    ensure!(urls.len() == 3, "expected three URLs, got {urls:?}");
    let up_secs = t_up.elapsed().as_secs_f64();
    Ok((urls, up_secs))
}

/// A fresh namespace and database on the cluster, two workers (on different
/// nodes, if six starts can manage it) and the gateway, all ready.
pub async fn deploy(urls: &[String]) -> anyhow::Result<Deployment> {
    let mut env = TestEnv::new("cluster");
    let smtp = Arc::new(SmtpServer::start());
    env.set("AMQP_URL", urls.join(","));
    env.set("MAIL_URL", smtp.mail_url());
    // Every click comes from 127.0.0.1.
    env.set("CONFIRM_RATE_LIMIT_PER_MINUTE", "1000000");
    // The contract's default: 64 deliveries in flight per worker, all handed
    // back when its node dies.
    env.set("WORKER_CONCURRENCY", "64");
    let topology = Topology::new(env.namespace.clone());
    let config = env.config();
    let signer = Arc::new(Signer::new(&config.keys()?, config.itsdangerous_digest));
    let (code, _, err) = cli(&["migrate"], &env).await;
    ensure!(code == 0, "verimail migrate failed: {err}");

    // Worker A declares the topology first, so `{ns}.worker`'s leader is on
    // its node; worker B is restarted until it sits on another node, so the
    // kill takes one worker's connection and leaves the other's.
    let start_worker = |env: &TestEnv| {
        let (worker, metrics_addr) = start_extra_worker(env);
        (worker, readyz_url(&metrics_addr))
    };
    let (worker_a, ready) = start_worker(&env);
    ensure!(
        wait_http_ok(&ready, WAIT).await,
        "worker A never ready:\n{}",
        worker_a.log()
    );
    let port_a = connected_port(&worker_a.log()).context("worker A's node")?;
    let mut worker_b = None;
    let mut b_attempts = 0;
    for _ in 0..6 {
        b_attempts += 1;
        let (w, ready) = start_worker(&env);
        ensure!(
            wait_http_ok(&ready, WAIT).await,
            "worker B never ready:\n{}",
            w.log()
        );
        let port = connected_port(&w.log()).context("worker B's node")?;
        if port != port_a {
            worker_b = Some((w, port));
            break;
        }
        w.stop(Duration::from_secs(30)).await;
    }
    // Six shuffles that all land on A's node are unlikely (1 in 729); if
    // it happens, go on with both there and say so.
    let (worker_b, port_b) = match worker_b {
        Some(b) => b,
        None => {
            let (w, ready) = start_worker(&env);
            ensure!(
                wait_http_ok(&ready, WAIT).await,
                "worker B never ready:\n{}",
                w.log()
            );
            let port = connected_port(&w.log()).context("worker B's node")?;
            (w, port)
        }
    };
    let gateway = Proc::start("verimail-gateway", &[], &env);
    ensure!(
        wait_http_ok(&format!("{}/readyz", env.gateway_ops_url()), WAIT).await,
        "gateway never ready:\n{}",
        gateway.log()
    );
    let port_gw = connected_port(&gateway.log());
    Ok(Deployment {
        env,
        topology,
        smtp,
        signer,
        worker_a,
        port_a,
        worker_b,
        port_b,
        b_attempts,
        gateway,
        port_gw,
    })
}

/// Starts the tap and the clicker, and connects the publisher: they take the
/// whole list of URLs too, like any client.
pub async fn watch(urls: &[String], d: &Deployment) -> anyhow::Result<Watchers> {
    let stop = CancellationToken::new();
    let bus_stop = CancellationToken::new();
    let tap_bus = Bus::connect(urls, "cluster-test-tap", &bus_stop).await?;
    let tap_queue = declare_subscriber(
        &tap_bus.channel().await?,
        &d.topology,
        "cluster-tap",
        TAPPED,
    )
    .await?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let tap_reconnects = Arc::new(AtomicU64::new(0));
    let tap = tokio::spawn(run_tap(
        tap_bus.clone(),
        tap_queue.clone(),
        seen.clone(),
        tap_reconnects.clone(),
        stop.clone(),
    ));
    let pub_bus = Bus::connect(urls, "cluster-test-publisher", &bus_stop).await?;
    let publisher = Arc::new(Publisher::new(pub_bus.clone()));

    let clicks = Arc::new(Mutex::new(Clicks::default()));
    let pending_clicks = Arc::new(AtomicUsize::new(0));
    let clicker = tokio::spawn(click_links(
        d.smtp.clone(),
        d.signer.clone(),
        clicks.clone(),
        pending_clicks.clone(),
        stop.clone(),
    ));
    Ok(Watchers {
        stop,
        bus_stop,
        tap_bus,
        tap_queue,
        seen,
        tap_reconnects,
        tap,
        pub_bus,
        publisher,
        clicks,
        pending_clicks,
        clicker,
    })
}
