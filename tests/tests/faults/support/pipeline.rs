//! The deployment a scenario breaks: workers, optionally a gateway, the SMTP
//! server, the tap and a publisher on the raw bus; and the probes a scenario
//! reads afterwards (dead letters, queues at rest, a process's memory).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use verimail_shared::bus::{Bus, Outgoing, Publisher, RETRY_DELAYS, Topology};
use verimail_shared::events::VERIFICATION_REQUESTED;
use verimail_tests::env::TestEnv;
use verimail_tests::procs::{Proc, cli, readyz_url, start_extra_worker, tail, wait_http_ok};
use verimail_tests::smtp::SmtpServer;

use super::tap::Tap;
use crate::{CONCURRENCY, NO_RATE_LIMIT, READY};

/// A running deployment: workers, optionally a gateway, the SMTP server, the
/// tap, and a publisher on the raw bus.
pub struct Pipeline {
    pub env: TestEnv,
    pub smtp: SmtpServer,
    pub tap: Tap,
    pub workers: Vec<Proc>,
    /// `/readyz` of each worker, in the order of `workers`.
    pub worker_readyz: Vec<String>,
    pub gateway: Option<Proc>,
    pub topology: Topology,
    pub publisher: Arc<Publisher>,
    pub bus_stop: CancellationToken,
}

impl Pipeline {
    pub async fn start(
        label: &str,
        workers: usize,
        gateway: bool,
        tweak: impl FnOnce(&mut TestEnv),
    ) -> Self {
        let mut env = TestEnv::new(label);
        let smtp = SmtpServer::start();
        env.set("MAIL_URL", smtp.mail_url());
        env.set("WORKER_CONCURRENCY", CONCURRENCY.to_string());
        env.set("CONFIRM_RATE_LIMIT_PER_MINUTE", NO_RATE_LIMIT);
        tweak(&mut env);
        let (code, _, err) = cli(&["migrate"], &env).await;
        assert_eq!(code, 0, "verimail migrate failed: {err}");
        let tap = Tap::start(&env).await;
        let bus_stop = CancellationToken::new();
        let bus = Bus::connect(&env.config().amqp_urls, "faults-publisher", &bus_stop)
            .await
            .expect("the test publisher connects");
        let mut p = Self {
            topology: Topology::new(env.namespace.clone()),
            publisher: Arc::new(Publisher::new(bus)),
            env,
            smtp,
            tap,
            workers: Vec::new(),
            worker_readyz: Vec::new(),
            gateway: None,
            bus_stop,
        };
        for _ in 0..workers {
            p.add_worker().await;
        }
        if gateway {
            let g = start_gateway(&p.env).await;
            p.gateway = Some(g);
        }
        p
    }

    /// Starts one more worker (its own metrics port) and waits until it is ready.
    pub async fn add_worker(&mut self) {
        let (p, metrics_addr) = start_extra_worker(&self.env);
        let ready = readyz_url(&metrics_addr);
        assert!(
            wait_http_ok(&ready, READY).await,
            "worker never ready:\n{}",
            tail(&p.log(), 30)
        );
        self.workers.push(p);
        self.worker_readyz.push(ready);
    }

    /// Whether every worker and the gateway answer `/readyz` 200 within `timeout`.
    pub async fn all_ready(&self, timeout: Duration) -> bool {
        for url in &self.worker_readyz {
            if !wait_http_ok(url, timeout).await {
                return false;
            }
        }
        match &self.gateway {
            Some(_) => {
                wait_http_ok(&format!("{}/readyz", self.env.gateway_ops_url()), timeout).await
            }
            None => true,
        }
    }

    /// Publishes one raw request body, retrying until the broker confirms it.
    pub async fn publish_raw(&self, id: &str, body: &[u8]) -> u32 {
        publish_confirmed(&self.publisher, &self.topology, id, body).await
    }

    /// Publishes `n` valid requests `{prefix}-{i:05}` (one user each, so none is
    /// throttled), 64 at a time; returns their ids.
    pub async fn publish_many(&self, prefix: &str, n: usize) -> Vec<String> {
        let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i:05}")).collect();
        futures_util::stream::iter(ids.iter().enumerate())
            .for_each_concurrent(64, |(i, id)| async move {
                let body = request_body(
                    id,
                    &format!("u-{prefix}-{i}"),
                    &format!("{prefix}{i}@example.com"),
                );
                self.publish_raw(id, &body).await;
            })
            .await;
        ids
    }

    pub fn worker_logs(&self) -> String {
        self.workers
            .iter()
            .map(|w| tail(&w.log(), 40))
            .collect::<Vec<_>>()
            .join("\n---\n")
    }

    /// Stops everything; every service must exit 0 on SIGTERM.
    pub async fn stop(self) {
        self.bus_stop.cancel();
        self.publisher.bus().close().await;
        let mut codes = Vec::new();
        for w in self.workers {
            codes.push(("worker", w.stop(Duration::from_secs(30)).await));
        }
        if let Some(g) = self.gateway {
            codes.push(("gateway", g.stop(Duration::from_secs(30)).await));
        }
        self.tap.stop(&self.env).await;
        self.env.cleanup().await;
        for (name, code) in codes {
            assert_eq!(code, Some(0), "{name} exits 0 on SIGTERM");
        }
    }
}

/// Starts a gateway with `env` and waits until `/healthz` answers (not
/// `/readyz`: some scenarios start it without a broker on purpose).
pub async fn start_gateway(env: &TestEnv) -> Proc {
    let g = Proc::start("verimail-gateway", &[], env);
    assert!(
        wait_http_ok(&format!("{}/healthz", env.gateway_ops_url()), READY).await,
        "gateway never answered:\n{}",
        tail(&g.log(), 30)
    );
    g
}

async fn publish_confirmed(
    publisher: &Publisher,
    topology: &Topology,
    id: &str,
    body: &[u8],
) -> u32 {
    let msg = Outgoing::event(topology, VERIFICATION_REQUESTED, id, body);
    let mut retries = 0;
    loop {
        match publisher.publish(&msg).await {
            Ok(()) => return retries,
            Err(e) => {
                retries += 1;
                assert!(retries < 300, "publishing {id} keeps failing: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// A valid request.
pub fn request_body(id: &str, user_id: &str, email: &str) -> Vec<u8> {
    json!({
        "specversion": "1.0", "id": id, "source": "/faults", "type": VERIFICATION_REQUESTED,
        "datacontenttype": "application/json",
        "data": {"user_id": user_id, "email": email},
    })
    .to_string()
    .into_bytes()
}

/// Every letter in `{ns}.dead`, as `verimail dead list` prints them.
pub async fn dead_letters(env: &TestEnv) -> Vec<Value> {
    let (code, out, err) = cli(&["dead", "list"], env).await;
    assert_eq!(code, 0, "verimail dead list failed: {err}");
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("dead list prints JSON lines"))
        .collect()
}

/// Waits until the worker queue and every retry queue hold no ready message
/// for two seconds in a row (nothing left to deliver), or `timeout`.
pub async fn quiesce(env: &TestEnv, timeout: Duration) -> bool {
    let topology = Topology::new(env.namespace.clone());
    let mut queues = vec![topology.worker_queue()];
    queues.extend(RETRY_DELAYS.iter().map(|d| topology.retry_queue(*d)));
    let deadline = Instant::now() + timeout;
    let mut quiet_since: Option<Instant> = None;
    while Instant::now() < deadline {
        let mut total = None;
        if let Ok(conn) = lapin::Connection::connect(
            env.get("AMQP_URL").unwrap_or_default(),
            lapin::ConnectionProperties::default(),
        )
        .await
            && let Ok(ch) = conn.create_channel().await
        {
            let mut sum = 0;
            let mut ok = true;
            for q in &queues {
                match ch
                    .queue_declare(
                        q.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..QueueDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                {
                    Ok(q) => sum += q.message_count(),
                    Err(_) => ok = false,
                }
            }
            let _ = conn.close(200, "probe".into()).await;
            if ok {
                total = Some(sum);
            }
        }
        match total {
            Some(0) => {
                let since = *quiet_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= Duration::from_secs(2) {
                    return true;
                }
            }
            _ => quiet_since = None,
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    false
}

/// Resident memory of a process, in KiB (`VmRSS` of `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
