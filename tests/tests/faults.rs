//! Fault injection: the real binaries, the machine's RabbitMQ and PostgreSQL and
//! an SMTP server inside the test, while something breaks on purpose (a worker
//! killed with SIGKILL, the broker or the database restarted, the SMTP server
//! gone, the gateway without a broker, a flood of poison).
//!
//! Each scenario prints its figures (requests, outcomes, mails, duplicates,
//! lost) with `println!` (`cargo test --test faults -- --nocapture` shows them)
//! and puts them in every failing assertion's message.
//!
//! The tests here run one at a time ([`SERIAL`]). The two that restart the
//! machine's broker or database cut every connection on the machine, so they
//! run only with `VERIMAIL_FAULT_TESTS=1`: `scripts/test.sh` sets it and runs
//! them alone, after every other test binary.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use verimail_producer::{Producer, VerificationRequest};
use verimail_shared::bus::{self, Bus, Outgoing, Publisher, RETRY_DELAYS, Topology};
use verimail_shared::events::{
    EMAIL_VERIFIED, VERIFICATION_FAILED, VERIFICATION_REQUESTED, VERIFICATION_SENT,
    VERIFICATION_THROTTLED,
};
use verimail_tests::env::{TestEnv, free_port};
use verimail_tests::http;
use verimail_tests::procs::{Proc, cli, wait_http_ok};
use verimail_tests::smtp::{CapturedMail, SmtpServer};

/// One fault scenario at a time (see the module docs).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long a service may take to become ready.
const READY: Duration = Duration::from_secs(45);
/// Worker concurrency in these tests (also the most deliveries in flight when a
/// worker dies, so the most mails a crash can send twice).
const CONCURRENCY: usize = 16;
/// Clicks come from 127.0.0.1 by the hundred: the rate limit is not under test here.
const NO_RATE_LIMIT: &str = "1000000";
/// Whether the tests that stop the machine's RabbitMQ or PostgreSQL may run:
/// only with `VERIMAIL_FAULT_TESTS=1` (`scripts/test.sh` sets it and runs them
/// alone), so a contributor's plain `cargo test` never stops their database
/// or a neighbouring test's broker.
fn machine_faults_allowed(test: &str) -> bool {
    let allowed = std::env::var("VERIMAIL_FAULT_TESTS").is_ok_and(|v| v == "1");
    if !allowed {
        eprintln!(
            "{test}: skipped: it stops the machine's broker or database \
             (VERIMAIL_FAULT_TESTS=1 runs it; scripts/test.sh does)"
        );
    }
    allowed
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------
// A tap that survives a broker restart
// ---------------------------------------------------------------------------

/// What the tap has received: every copy, and each distinct event once.
#[derive(Debug, Default)]
struct Seen {
    /// Copies received, duplicates (same event id) included.
    copies: usize,
    /// Event ids seen.
    ids: HashSet<String>,
    /// Each distinct event, in arrival order.
    events: Vec<Value>,
}

/// What the tap binds: every event a verimail service emits (requests are
/// not tapped: poison among them has no id to tell copies apart).
const TAPPED: [&str; 4] = [
    VERIFICATION_SENT,
    VERIFICATION_THROTTLED,
    VERIFICATION_FAILED,
    EMAIL_VERIFIED,
];

/// Captures the events services emit in a durable subscriber queue
/// (`{ns}.sub.faults`, bound to [`TAPPED`]), consumed by a loop that
/// reconnects: unlike the exclusive queue of `EventTap`, nothing published
/// while the broker restarts or the tap reconnects is lost.
#[derive(Debug, Clone)]
struct Tap {
    seen: Arc<Mutex<Seen>>,
    stop: CancellationToken,
    queue: String,
    url: String,
}

impl Tap {
    /// Declares the topology and the tap's queue (so outcomes have somewhere to
    /// go before any service starts), then consumes in the background.
    async fn start(env: &TestEnv) -> Self {
        let url = env.get("AMQP_URL").unwrap_or_default().to_owned();
        let topology = Topology::new(env.namespace.clone());
        let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
            .await
            .expect("the tap connects to RabbitMQ");
        let ch = conn.create_channel().await.expect("a channel for the tap");
        bus::declare(&ch, &topology)
            .await
            .expect("the topology is declared");
        let queue = bus::declare_subscriber(&ch, &topology, "faults", &TAPPED)
            .await
            .expect("the tap's queue is declared");
        let _ = conn.close(200, "declared".into()).await;
        let tap = Self {
            seen: Arc::new(Mutex::new(Seen::default())),
            stop: CancellationToken::new(),
            queue,
            url,
        };
        tokio::spawn(tap.clone().consume());
        tap
    }

    async fn consume(self) {
        while !self.stop.is_cancelled() {
            let session = async {
                let conn =
                    lapin::Connection::connect(&self.url, lapin::ConnectionProperties::default())
                        .await?;
                let ch = conn.create_channel().await?;
                ch.basic_qos(500, BasicQosOptions::default()).await?;
                let mut consumer = ch
                    .basic_consume(
                        self.queue.as_str().into(),
                        "faults-tap".into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                while let Some(delivery) = consumer.next().await {
                    let delivery = delivery?;
                    let value: Value =
                        serde_json::from_slice(&delivery.data).unwrap_or(Value::Null);
                    {
                        let mut seen = lock(&self.seen);
                        seen.copies += 1;
                        let id = value["id"].as_str().unwrap_or_default().to_owned();
                        if seen.ids.insert(id) {
                            seen.events.push(value);
                        }
                    }
                    delivery.ack(BasicAckOptions::default()).await?;
                }
                Ok::<(), lapin::Error>(())
            };
            tokio::select! {
                _ = session => {}
                () = self.stop.cancelled() => return,
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Copies received beyond the first of each event.
    fn extra_copies(&self) -> usize {
        let seen = lock(&self.seen);
        seen.copies - seen.events.len()
    }

    /// Distinct outcome events per request id.
    fn outcomes(&self) -> HashMap<String, Vec<Value>> {
        let mut by_request: HashMap<String, Vec<Value>> = HashMap::new();
        for e in lock(&self.seen).events.iter().filter(|e| is_outcome(e)) {
            let id = e["data"]["request_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            by_request.entry(id).or_default().push(e.clone());
        }
        by_request
    }

    /// Distinct verified events per request id.
    fn verified(&self) -> HashMap<String, usize> {
        let mut by_request: HashMap<String, usize> = HashMap::new();
        for e in lock(&self.seen)
            .events
            .iter()
            .filter(|e| e["type"] == EMAIL_VERIFIED)
        {
            let id = e["data"]["request_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            *by_request.entry(id).or_default() += 1;
        }
        by_request
    }

    /// How many of `ids` have an outcome.
    fn answered(&self, ids: &[String]) -> usize {
        let outcomes = self.outcomes();
        ids.iter().filter(|id| outcomes.contains_key(*id)).count()
    }

    /// Waits until every one of `ids` has an outcome, or `timeout`.
    async fn wait_answered(&self, ids: &[String], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.answered(ids) == ids.len() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `n` distinct verified events arrived, or `timeout`.
    async fn wait_verified(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.verified().values().sum::<usize>() >= n {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn stop(&self, env: &TestEnv) {
        self.stop.cancel();
        if let Ok(conn) =
            lapin::Connection::connect(&self.url, lapin::ConnectionProperties::default()).await
            && let Ok(ch) = conn.create_channel().await
        {
            let _ = ch
                .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
                .await;
            let _ = conn.close(200, "cleanup".into()).await;
        }
        let _ = env;
    }
}

fn is_outcome(e: &Value) -> bool {
    e["type"] == VERIFICATION_SENT
        || e["type"] == VERIFICATION_THROTTLED
        || e["type"] == VERIFICATION_FAILED
}

/// `sent`, `throttled`, `failed/REASON`.
fn outcome_label(e: &Value) -> String {
    match e["type"].as_str() {
        Some(VERIFICATION_SENT) => "sent".into(),
        Some(VERIFICATION_THROTTLED) => "throttled".into(),
        Some(VERIFICATION_FAILED) => {
            format!("failed/{}", e["data"]["reason"].as_str().unwrap_or("?"))
        }
        other => format!("{other:?}"),
    }
}

/// The request id a mail was sent for: the worker derives the `Message-ID`
/// from it (`<{request_id}.{hash}@{domain}>`, for ids without dots).
fn mail_request(mail: &CapturedMail) -> String {
    mail.message_id
        .as_deref()
        .and_then(|m| m.split('.').next())
        .unwrap_or_default()
        .to_owned()
}

// ---------------------------------------------------------------------------
// Figures
// ---------------------------------------------------------------------------

/// What a scenario measured.
#[derive(Debug, Default)]
struct Figures {
    scenario: &'static str,
    requests: usize,
    /// Distinct outcome events by label.
    outcomes: BTreeMap<String, usize>,
    /// Requests without any outcome.
    lost: usize,
    /// Requests with more than one distinct outcome event (a contract breach).
    double_outcomes: usize,
    /// Copies of an event received again with the same id (re-publish or tap redelivery).
    extra_copies: usize,
    mails: usize,
    /// Requests that got no mail though their outcome is `sent`.
    sent_without_mail: usize,
    /// Mails beyond the first for one request.
    duplicate_mails: usize,
    /// Anything else the scenario wants on the line.
    extra: Vec<(String, String)>,
}

impl Figures {
    fn measure(scenario: &'static str, ids: &[String], tap: &Tap, mails: &[CapturedMail]) -> Self {
        let outcomes = tap.outcomes();
        let mut f = Self {
            scenario,
            requests: ids.len(),
            extra_copies: tap.extra_copies(),
            mails: mails.len(),
            ..Self::default()
        };
        let mut per_request: HashMap<String, usize> = HashMap::new();
        for m in mails {
            *per_request.entry(mail_request(m)).or_default() += 1;
        }
        f.duplicate_mails = per_request.values().map(|n| n.saturating_sub(1)).sum();
        for id in ids {
            match outcomes.get(id) {
                None => f.lost += 1,
                Some(list) => {
                    if list.len() > 1 {
                        f.double_outcomes += 1;
                    }
                    for e in list {
                        *f.outcomes.entry(outcome_label(e)).or_default() += 1;
                    }
                    if list.iter().any(|e| e["type"] == VERIFICATION_SENT)
                        && !per_request.contains_key(id)
                    {
                        f.sent_without_mail += 1;
                    }
                }
            }
        }
        f
    }

    fn note(&mut self, key: &str, value: impl fmt::Display) -> &mut Self {
        self.extra.push((key.to_owned(), value.to_string()));
        self
    }

    fn print(&self) {
        println!("[faults] {self}");
    }
}

impl fmt::Display for Figures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: requests={} outcomes={:?} lost={} double_outcomes={} extra_copies={} \
             mails={} duplicate_mails={} sent_without_mail={}",
            self.scenario,
            self.requests,
            self.outcomes,
            self.lost,
            self.double_outcomes,
            self.extra_copies,
            self.mails,
            self.duplicate_mails,
            self.sent_without_mail
        )?;
        for (k, v) in &self.extra {
            write!(f, " {k}={v}")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// The deployment
// ---------------------------------------------------------------------------

/// A running deployment: workers, optionally a gateway, the SMTP server, the
/// tap, and a publisher on the raw bus.
struct Pipeline {
    env: TestEnv,
    smtp: SmtpServer,
    tap: Tap,
    workers: Vec<Proc>,
    /// `/readyz` of each worker, in the order of `workers`.
    worker_readyz: Vec<String>,
    gateway: Option<Proc>,
    topology: Topology,
    publisher: Arc<Publisher>,
    bus_stop: CancellationToken,
}

impl Pipeline {
    async fn start(
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
    async fn add_worker(&mut self) {
        let mut wenv = self.env.clone();
        wenv.set("METRICS_ADDR", format!("127.0.0.1:{}", free_port()));
        let p = Proc::start("verimail-worker", &[], &wenv);
        let ready = format!(
            "http://{}/readyz",
            wenv.get("METRICS_ADDR").unwrap_or_default()
        );
        assert!(
            wait_http_ok(&ready, READY).await,
            "worker never ready:\n{}",
            tail(&p.log(), 30)
        );
        self.workers.push(p);
        self.worker_readyz.push(ready);
    }

    /// Whether every worker and the gateway answer `/readyz` 200 within `timeout`.
    async fn all_ready(&self, timeout: Duration) -> bool {
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
    async fn publish_raw(&self, id: &str, body: &[u8]) -> u32 {
        publish_confirmed(&self.publisher, &self.topology, id, body).await
    }

    /// Publishes `n` valid requests `{prefix}-{i:05}` (one user each, so none is
    /// throttled), 64 at a time; returns their ids.
    async fn publish_many(&self, prefix: &str, n: usize) -> Vec<String> {
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

    fn worker_logs(&self) -> String {
        self.workers
            .iter()
            .map(|w| tail(&w.log(), 40))
            .collect::<Vec<_>>()
            .join("\n---\n")
    }

    /// Stops everything; every service must exit 0 on SIGTERM.
    async fn stop(self) {
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
async fn start_gateway(env: &TestEnv) -> Proc {
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
fn request_body(id: &str, user_id: &str, email: &str) -> Vec<u8> {
    json!({
        "specversion": "1.0", "id": id, "source": "/faults", "type": VERIFICATION_REQUESTED,
        "datacontenttype": "application/json",
        "data": {"user_id": user_id, "email": email},
    })
    .to_string()
    .into_bytes()
}

fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Every letter in `{ns}.dead`, as `verimail dead list` prints them.
async fn dead_letters(env: &TestEnv) -> Vec<Value> {
    let (code, out, err) = cli(&["dead", "list"], env).await;
    assert_eq!(code, 0, "verimail dead list failed: {err}");
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("dead list prints JSON lines"))
        .collect()
}

/// Waits until the worker queue and every retry queue hold no ready message
/// for two seconds in a row (nothing left to deliver), or `timeout`.
async fn quiesce(env: &TestEnv, timeout: Duration) -> bool {
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
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Clicking links while things break
// ---------------------------------------------------------------------------

/// What clicking every link did.
#[derive(Debug, Default, Clone)]
struct Clicks {
    /// Links confirmed (200 verified or already_verified), by request id.
    confirmed: HashSet<String>,
    /// Attempts answered 503 (database unavailable): retried.
    unavailable: usize,
    /// Attempts that failed at the socket (gateway not answering): retried.
    socket_errors: usize,
    /// Any other answer: never expected.
    unexpected: Vec<String>,
}

/// Clicks every link the SMTP server receives until `want` distinct requests
/// are confirmed or `deadline`; each click is retried while it answers 503 or
/// the socket fails.
async fn click_all(smtp: &SmtpServer, want: usize, deadline: Instant) -> Clicks {
    let mut clicks = Clicks::default();
    let mut next = 0;
    while clicks.confirmed.len() < want && Instant::now() < deadline {
        let mails = smtp.mails();
        if mails.len() <= next {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        for mail in &mails[next..] {
            let request = mail_request(mail);
            if clicks.confirmed.contains(&request) {
                continue;
            }
            let Some(link) = mail.link.clone() else {
                clicks
                    .unexpected
                    .push(format!("{request}: no link in the mail"));
                continue;
            };
            loop {
                match http::post(&link, &[("Accept", "application/json")]).await {
                    Ok((200, _, body)) if body.contains("verified") => {
                        clicks.confirmed.insert(request.clone());
                        break;
                    }
                    Ok((503, _, _)) => clicks.unavailable += 1,
                    Ok((code, _, body)) => {
                        clicks.unexpected.push(format!("{request}: {code} {body}"));
                        break;
                    }
                    Err(_) => clicks.socket_errors += 1,
                }
                if Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        next = mails.len();
    }
    clicks
}

// ---------------------------------------------------------------------------
// Guards that put the machine's services back, whatever happens
// ---------------------------------------------------------------------------

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    )
    .is_ok()
}

fn wait_port(port: u16, open: bool, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if port_open(port) == open {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    match std::process::Command::new(cmd).args(args).output() {
        Ok(out) => (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ),
        Err(e) => (false, format!("cannot run {cmd}: {e}")),
    }
}

/// How long a service was away.
#[derive(Debug, Clone, Copy)]
struct Outage {
    /// The stop command's own duration.
    stopping: Duration,
    /// From the port closing to the port answering again.
    down: Duration,
}

/// Stops the RabbitMQ application of the machine's broker (5672); starting it
/// again is [`BrokerDown::start`], or dropping the guard (also when the test
/// panics).
struct BrokerDown {
    down_since: Option<Instant>,
    stopping: Duration,
    started: bool,
}

impl BrokerDown {
    fn stop() -> Self {
        // The guard exists before anything can fail, so the broker always comes back.
        let mut guard = Self {
            down_since: None,
            stopping: Duration::ZERO,
            started: false,
        };
        let t = Instant::now();
        let (ok, out) = run("rabbitmqctl", &["stop_app"]);
        assert!(ok, "rabbitmqctl stop_app failed: {out}");
        assert!(
            wait_port(5672, false, Duration::from_secs(30)),
            "5672 still open after stop_app"
        );
        guard.stopping = t.elapsed();
        guard.down_since = Some(Instant::now());
        guard
    }

    /// `rabbitmqctl start_app`, then waits for the port.
    fn start(mut self) -> Outage {
        self.start_now();
        Outage {
            stopping: self.stopping,
            down: self.down_since.map(|t| t.elapsed()).unwrap_or_default(),
        }
    }

    fn start_now(&mut self) {
        if std::mem::replace(&mut self.started, true) {
            return;
        }
        let (ok, out) = run("rabbitmqctl", &["start_app"]);
        if !ok {
            eprintln!("rabbitmqctl start_app failed: {out}");
        }
        if !wait_port(5672, true, Duration::from_secs(60)) {
            eprintln!("RabbitMQ did not open 5672 again within 60 s");
        }
    }
}

impl Drop for BrokerDown {
    fn drop(&mut self) {
        self.start_now();
    }
}

/// The machine's PostgreSQL cluster version (`ls /etc/postgresql`).
fn pg_version() -> String {
    std::fs::read_dir("/etc/postgresql")
        .ok()
        .and_then(|mut d| d.next())
        .and_then(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .expect("PostgreSQL is installed (/etc/postgresql/VERSION)")
}

/// Stops the machine's PostgreSQL cluster (5432, fast shutdown: sessions are
/// cut); starting it again is [`DatabaseDown::start`], or dropping the guard
/// (also when the test panics).
struct DatabaseDown {
    version: String,
    down_since: Option<Instant>,
    stopping: Duration,
    started: bool,
}

impl DatabaseDown {
    fn stop() -> Self {
        let mut guard = Self {
            version: pg_version(),
            down_since: None,
            stopping: Duration::ZERO,
            started: false,
        };
        let t = Instant::now();
        let (ok, out) = run(
            "pg_ctlcluster",
            &[
                "--skip-systemctl-redirect",
                &guard.version,
                "main",
                "stop",
                "-m",
                "fast",
            ],
        );
        assert!(ok, "pg_ctlcluster stop failed: {out}");
        guard.stopping = t.elapsed();
        guard.down_since = Some(Instant::now());
        guard
    }

    /// `pg_ctlcluster start`, then waits for the port.
    fn start(mut self) -> Outage {
        self.start_now();
        Outage {
            stopping: self.stopping,
            down: self.down_since.map(|t| t.elapsed()).unwrap_or_default(),
        }
    }

    fn start_now(&mut self) {
        if std::mem::replace(&mut self.started, true) {
            return;
        }
        if !port_open(5432) {
            let (ok, out) = run(
                "pg_ctlcluster",
                &["--skip-systemctl-redirect", &self.version, "main", "start"],
            );
            if !ok {
                eprintln!("pg_ctlcluster start failed: {out}");
            }
        }
        if !wait_port(5432, true, Duration::from_secs(60)) {
            eprintln!("PostgreSQL did not open 5432 again within 60 s");
        }
    }
}

impl Drop for DatabaseDown {
    fn drop(&mut self) {
        self.start_now();
    }
}

// ---------------------------------------------------------------------------
// 1. A worker killed with SIGKILL
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_loses_no_request_and_its_replacement_finishes_them() {
    const N: usize = 1500;
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let mut p = Pipeline::start("kill", 1, false, |_| {}).await;
    let ids = p.publish_many("kill", N).await;
    let published_in = started.elapsed();

    // Kill the worker once about a third of the requests are answered.
    let deadline = Instant::now() + Duration::from_secs(60);
    while p.tap.answered(&ids) < N / 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let victim = p.workers.remove(0);
    p.worker_readyz.remove(0);
    victim.kill().await;
    let answered_at_kill = p.tap.answered(&ids);
    let mails_at_kill = p.smtp.count();
    assert!(
        answered_at_kill < N,
        "the worker finished everything before it could be killed ({answered_at_kill}/{N})"
    );
    let killed_at = Instant::now();
    p.add_worker().await;

    // Requests the dead worker held stay leased for the worker's LEASE (60 s):
    // their redeliveries wait in the retry queue until it runs out.
    let all = p.tap.wait_answered(&ids, Duration::from_secs(120)).await;
    let recovered_in = killed_at.elapsed();
    quiesce(&p.env, Duration::from_secs(30)).await;
    let mails = p.smtp.mails();
    let mut f = Figures::measure("worker SIGKILL", &ids, &p.tap, &mails);
    f.note("answered_at_kill", answered_at_kill)
        .note("mails_at_kill", mails_at_kill)
        .note(
            "published_in_s",
            format!("{:.1}", published_in.as_secs_f64()),
        )
        .note(
            "recovered_in_s",
            format!("{:.1}", recovered_in.as_secs_f64()),
        )
        .note("total_s", format!("{:.1}", started.elapsed().as_secs_f64()));
    f.print();
    let logs = p.worker_logs();
    assert!(all && f.lost == 0, "requests lost: {f}\n{logs}");
    assert_eq!(f.double_outcomes, 0, "one outcome per request: {f}");
    assert_eq!(f.outcomes.get("sent"), Some(&N), "every request sent: {f}");
    assert_eq!(
        f.sent_without_mail, 0,
        "every sent request has its mail: {f}"
    );
    // The crash window: a mail the SMTP server accepted before the outcome was
    // stored is sent again by the redelivery, at most one per delivery in flight.
    assert!(
        f.duplicate_mails <= CONCURRENCY,
        "more duplicates than deliveries in flight: {f}"
    );
    let dead = dead_letters(&p.env).await;
    assert!(dead.is_empty(), "nothing dead-lettered: {dead:?}\n{f}");
    p.stop().await;
}

// ---------------------------------------------------------------------------
// 2. The broker restarted while requests and clicks flow
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_while_requests_and_clicks_flow_loses_nothing() {
    if !machine_faults_allowed("a_broker_restart_while_requests_and_clicks_flow_loses_nothing") {
        return;
    }
    const N: usize = 400;
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let p = Pipeline::start("broker", 1, true, |_| {}).await;
    let producer = Producer::connect(&p.env.config())
        .await
        .expect("the producer connects")
        .with_source("/faults");
    let ids: Vec<String> = (0..N).map(|i| format!("brk-{i:05}")).collect();

    // Publish steadily (about 40 per second) through the producer library,
    // retrying a failed publish with the same id.
    let publishing = async {
        let mut retries = 0;
        for (i, id) in ids.iter().enumerate() {
            loop {
                let request =
                    VerificationRequest::new(format!("u-brk-{i}"), format!("brk{i}@example.com"))
                        .id(id.clone());
                match producer.request_verification(request).await {
                    Ok(_) => break,
                    Err(e) => {
                        retries += 1;
                        assert!(retries < 200, "the producer never got through: {e}");
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        retries
    };
    // Restart the broker's application a few seconds in, for a few seconds.
    let fault = async {
        tokio::time::sleep(Duration::from_secs(4)).await;
        let guard = tokio::task::spawn_blocking(BrokerDown::stop)
            .await
            .expect("stop_app ran");
        tokio::time::sleep(Duration::from_secs(5)).await;
        tokio::task::spawn_blocking(move || guard.start())
            .await
            .expect("start_app ran")
    };
    let clicking = click_all(&p.smtp, N, Instant::now() + Duration::from_secs(75));
    let (publish_retries, outage, clicks) = tokio::join!(publishing, fault, clicking);

    let answered = p.tap.wait_answered(&ids, Duration::from_secs(60)).await;
    let verified = p
        .tap
        .wait_verified(clicks.confirmed.len(), Duration::from_secs(30))
        .await;
    quiesce(&p.env, Duration::from_secs(30)).await;
    let mails = p.smtp.mails();
    let mut f = Figures::measure("broker restart", &ids, &p.tap, &mails);
    let verified_by_request = p.tap.verified();
    let lost_verified = clicks
        .confirmed
        .iter()
        .filter(|id| !verified_by_request.contains_key(*id))
        .count();
    let double_verified = verified_by_request.values().filter(|n| **n > 1).count();
    f.note(
        "broker_stop_took_s",
        format!("{:.1}", outage.stopping.as_secs_f64()),
    )
    .note("broker_down_s", format!("{:.1}", outage.down.as_secs_f64()))
    .note("publish_retries", publish_retries)
    .note("clicks_confirmed", clicks.confirmed.len())
    .note("click_503", clicks.unavailable)
    .note("click_socket_errors", clicks.socket_errors)
    .note(
        "verified_events",
        verified_by_request.values().sum::<usize>(),
    )
    .note("lost_verified", lost_verified)
    .note("double_verified", double_verified)
    .note("total_s", format!("{:.1}", started.elapsed().as_secs_f64()));
    f.print();

    let logs = p.worker_logs();
    assert!(answered && f.lost == 0, "requests lost: {f}\n{logs}");
    assert_eq!(f.double_outcomes, 0, "one outcome per request: {f}");
    assert_eq!(f.outcomes.get("sent"), Some(&N), "every request sent: {f}");
    assert_eq!(f.duplicate_mails, 0, "no mail twice: {f}");
    assert!(
        clicks.unexpected.is_empty(),
        "unexpected answers: {:?}\n{f}",
        clicks.unexpected
    );
    assert_eq!(clicks.unavailable, 0, "clicks never need the broker: {f}");
    assert_eq!(clicks.confirmed.len(), N, "every link confirmed: {f}");
    assert!(verified && lost_verified == 0, "verified events lost: {f}");
    assert_eq!(double_verified, 0, "one verified event per link: {f}");

    // Everyone came back by themselves.
    assert!(
        p.all_ready(Duration::from_secs(20)).await,
        "worker and gateway ready again after the restart: {f}"
    );
    let dead = dead_letters(&p.env).await;
    assert!(dead.is_empty(), "nothing dead-lettered: {dead:?}\n{f}");
    producer.close().await;
    p.stop().await;
}

// ---------------------------------------------------------------------------
// 3. The SMTP server away
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mails_held_up_by_an_smtp_outage_are_delivered_exactly_once_when_it_returns() {
    const N: usize = 60;
    const OUTAGE: Duration = Duration::from_secs(10);
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let mut p = Pipeline::start("smtp", 1, false, |_| {}).await;
    // Down before the requests arrive, so no mail is cut half-way (an SMTP
    // server that accepted a mail but whose 250 was lost is the one window
    // SMTP itself leaves for a duplicate).
    p.smtp.stop();
    let down_at = Instant::now();
    let ids = p.publish_many("smtp", N).await;
    tokio::time::sleep(OUTAGE.saturating_sub(down_at.elapsed())).await;
    let answered_during_outage = p.tap.answered(&ids);
    p.smtp.resume();
    let back_at = Instant::now();

    let all = p.tap.wait_answered(&ids, Duration::from_secs(75)).await;
    let delivered_after = back_at.elapsed();
    quiesce(&p.env, Duration::from_secs(30)).await;
    let mails = p.smtp.mails();
    let mut f = Figures::measure("smtp outage", &ids, &p.tap, &mails);
    f.note("outage_s", format!("{:.1}", OUTAGE.as_secs_f64()))
        .note("answered_during_outage", answered_during_outage)
        .note(
            "all_answered_after_return_s",
            format!("{:.1}", delivered_after.as_secs_f64()),
        )
        .note("smtp_connections", p.smtp.stats().connections)
        .note("total_s", format!("{:.1}", started.elapsed().as_secs_f64()));
    f.print();
    assert_eq!(
        answered_during_outage, 0,
        "nothing is answered while the server is away: {f}"
    );
    assert!(
        all && f.lost == 0,
        "requests lost: {f}\n{}",
        p.worker_logs()
    );
    assert_eq!(
        f.outcomes.get("sent"),
        Some(&N),
        "every request sent once it returned: {f}"
    );
    assert_eq!(f.double_outcomes, 0, "{f}");
    assert_eq!(
        (f.mails, f.duplicate_mails),
        (N, 0),
        "every mail exactly once: {f}"
    );
    let dead = dead_letters(&p.env).await;
    assert!(dead.is_empty(), "nothing dead-lettered: {dead:?}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_smtp_outage_past_the_retry_window_fails_dead_letters_and_replays_to_a_sent_mail() {
    const N: usize = 3;
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let mut p = Pipeline::start("window", 1, false, |env| {
        env.set("MAIL_RETRY_WINDOW_SECONDS", "8");
    })
    .await;
    p.smtp.stop();
    let ids = p.publish_many("win", N).await;
    let failed = p.tap.wait_answered(&ids, Duration::from_secs(60)).await;
    let gave_up_in = started.elapsed();
    let mut f = Figures::measure("smtp past the window", &ids, &p.tap, &p.smtp.mails());
    assert!(
        failed,
        "no outcome while the server stays away: {f}\n{}",
        p.worker_logs()
    );
    assert_eq!(f.outcomes.get("failed/delivery_failed"), Some(&N), "{f}");

    let dead = dead_letters(&p.env).await;
    let mut dead_ids: Vec<&str> = dead.iter().filter_map(|l| l["id"].as_str()).collect();
    dead_ids.sort_unstable();
    assert_eq!(
        dead_ids,
        ids.iter().map(String::as_str).collect::<Vec<_>>(),
        "{dead:?}"
    );
    assert!(
        dead.iter().all(|l| l["reason"] == "delivery_failed"),
        "{dead:?}"
    );

    // The server is back: the operator replays the letters.
    p.smtp.resume();
    let (code, out, err) = cli(&["dead", "replay", "--all"], &p.env).await;
    assert_eq!(code, 0, "dead replay failed: {err}");
    assert_eq!(
        out.lines().count(),
        N,
        "one line per replayed letter: {out}"
    );
    let deadline = Instant::now() + Duration::from_secs(45);
    let mut sent = 0;
    while Instant::now() < deadline {
        let outcomes = p.tap.outcomes();
        sent = ids
            .iter()
            .filter(|id| {
                outcomes
                    .get(*id)
                    .is_some_and(|l| l.iter().any(|e| e["type"] == VERIFICATION_SENT))
            })
            .count();
        if sent == N {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    quiesce(&p.env, Duration::from_secs(30)).await;
    let mails = p.smtp.mails();
    f = Figures::measure("smtp past the window, replayed", &ids, &p.tap, &mails);
    f.note(
        "gave_up_after_s",
        format!("{:.1}", gave_up_in.as_secs_f64()),
    )
    .note("dead_letters", dead.len())
    .note("sent_after_replay", sent)
    .note("total_s", format!("{:.1}", started.elapsed().as_secs_f64()));
    f.print();
    assert_eq!(
        sent,
        N,
        "every replayed request ends sent: {f}\n{}",
        p.worker_logs()
    );
    // Two outcomes per request, by design: the replay reopened a request whose
    // `failed` went out, and its new attempt ends `sent`.
    assert_eq!(f.outcomes.get("failed/delivery_failed"), Some(&N), "{f}");
    assert_eq!(f.outcomes.get("sent"), Some(&N), "{f}");
    assert_eq!((f.mails, f.duplicate_mails), (N, 0), "one mail each: {f}");
    assert!(
        dead_letters(&p.env).await.is_empty(),
        "the letters are gone once replayed"
    );
    p.stop().await;
}

// ---------------------------------------------------------------------------
// 4. The database restarted while requests and clicks flow
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_while_requests_and_clicks_flow_loses_nothing_and_nothing_crash_loops() {
    if !machine_faults_allowed(
        "a_database_restart_while_requests_and_clicks_flow_loses_nothing_and_nothing_crash_loops",
    ) {
        return;
    }
    const N: usize = 400;
    const DOWN: Duration = Duration::from_secs(5);
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let mut p = Pipeline::start("db", 1, true, |_| {}).await;
    let ids: Vec<String> = (0..N).map(|i| format!("db-{i:05}")).collect();

    let publishing = async {
        let mut retries = 0;
        for (i, id) in ids.iter().enumerate() {
            let body = request_body(id, &format!("u-db-{i}"), &format!("db{i}@example.com"));
            retries += p.publish_raw(id, &body).await;
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        retries
    };
    // Stop PostgreSQL a few seconds in, keep it down, start it again.
    let fault = async {
        tokio::time::sleep(Duration::from_secs(4)).await;
        let guard = tokio::task::spawn_blocking(DatabaseDown::stop)
            .await
            .expect("pg_ctlcluster stop ran");
        tokio::time::sleep(DOWN).await;
        tokio::task::spawn_blocking(move || guard.start())
            .await
            .expect("pg_ctlcluster start ran")
    };
    let clicking = click_all(&p.smtp, N, Instant::now() + Duration::from_secs(80));
    let (publish_retries, outage, clicks) = tokio::join!(publishing, fault, clicking);

    let answered = p.tap.wait_answered(&ids, Duration::from_secs(60)).await;
    let verified = p
        .tap
        .wait_verified(clicks.confirmed.len(), Duration::from_secs(30))
        .await;
    quiesce(&p.env, Duration::from_secs(30)).await;
    let mails = p.smtp.mails();
    let mut f = Figures::measure("database restart", &ids, &p.tap, &mails);
    let verified_by_request = p.tap.verified();
    let lost_verified = clicks
        .confirmed
        .iter()
        .filter(|id| !verified_by_request.contains_key(*id))
        .count();
    let double_verified = verified_by_request.values().filter(|n| **n > 1).count();
    let worker_running = p.workers.iter_mut().all(Proc::is_running);
    let gateway_running = p.gateway.as_mut().is_some_and(Proc::is_running);
    f.note(
        "db_stop_took_s",
        format!("{:.1}", outage.stopping.as_secs_f64()),
    )
    .note("db_down_s", format!("{:.1}", outage.down.as_secs_f64()))
    .note("publish_retries", publish_retries)
    .note("clicks_confirmed", clicks.confirmed.len())
    .note("click_503", clicks.unavailable)
    .note("click_socket_errors", clicks.socket_errors)
    .note(
        "verified_events",
        verified_by_request.values().sum::<usize>(),
    )
    .note("lost_verified", lost_verified)
    .note("double_verified", double_verified)
    .note("total_s", format!("{:.1}", started.elapsed().as_secs_f64()));
    f.print();

    assert!(
        worker_running && gateway_running,
        "no process died: {f}\n{}",
        p.worker_logs()
    );
    assert!(
        answered && f.lost == 0,
        "requests lost: {f}\n{}",
        p.worker_logs()
    );
    assert_eq!(f.double_outcomes, 0, "one outcome per request: {f}");
    assert_eq!(f.outcomes.get("sent"), Some(&N), "every request sent: {f}");
    assert_eq!(f.sent_without_mail, 0, "{f}");
    assert!(
        clicks.unexpected.is_empty(),
        "unexpected answers: {:?}\n{f}",
        clicks.unexpected
    );
    assert_eq!(
        clicks.confirmed.len(),
        N,
        "every link confirmed in the end: {f}"
    );
    assert!(verified && lost_verified == 0, "verified events lost: {f}");
    assert_eq!(double_verified, 0, "one verified event per link: {f}");
    assert!(
        p.all_ready(Duration::from_secs(20)).await,
        "worker and gateway ready again after the restart: {f}"
    );
    let dead = dead_letters(&p.env).await;
    assert!(dead.is_empty(), "nothing dead-lettered: {dead:?}\n{f}");
    p.stop().await;
}

// ---------------------------------------------------------------------------
// 5. The gateway without a broker
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clicks_succeed_without_a_broker_and_their_verified_events_go_out_once_it_is_there() {
    const N: usize = 20;
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let mut p = Pipeline::start("nobroker", 1, false, |_| {}).await;
    // The gateway's broker is a closed port.
    let mut genv = p.env.clone();
    genv.set(
        "AMQP_URL",
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port()),
    );
    let gateway = start_gateway(&genv).await;
    let ids = p.publish_many("nob", N).await;
    assert!(
        p.tap.wait_answered(&ids, Duration::from_secs(45)).await,
        "{}",
        p.worker_logs()
    );

    let clicks = click_all(&p.smtp, N, Instant::now() + Duration::from_secs(30)).await;
    let readyz = http::get(&format!("{}/readyz", genv.gateway_ops_url()), &[])
        .await
        .map(|a| a.0)
        .unwrap_or(0);
    // The relay has nowhere to publish: the events wait in the outbox.
    let waiting = outbox_rows(&p.env).await;
    let early = p.tap.verified().values().sum::<usize>();

    // The gateway comes back with the right broker URL, on the same port.
    assert_eq!(
        gateway.stop(Duration::from_secs(30)).await,
        Some(0),
        "gateway exits 0 without a broker"
    );
    p.gateway = Some(start_gateway(&p.env).await);
    let verified = p.tap.wait_verified(N, Duration::from_secs(30)).await;
    let verified_by_request = p.tap.verified();
    let mut f = Figures::measure("gateway without broker", &ids, &p.tap, &p.smtp.mails());
    f.note("clicks_confirmed", clicks.confirmed.len())
        .note("readyz_without_broker", readyz)
        .note("outbox_rows_waiting", waiting)
        .note("verified_before_broker", early)
        .note(
            "verified_after",
            verified_by_request.values().sum::<usize>(),
        )
        .note("outbox_rows_after", outbox_rows(&p.env).await)
        .note("total_s", format!("{:.1}", started.elapsed().as_secs_f64()));
    f.print();
    assert!(
        clicks.unexpected.is_empty() && clicks.unavailable == 0,
        "{:?}\n{f}",
        clicks.unexpected
    );
    assert_eq!(
        clicks.confirmed.len(),
        N,
        "every click succeeds without a broker: {f}"
    );
    assert_eq!(readyz, 503, "not ready without a broker: {f}");
    assert_eq!(
        (early, waiting),
        (0, N as i64),
        "events wait in the outbox: {f}"
    );
    assert!(
        verified,
        "verified events go out once the broker is there: {f}"
    );
    assert!(
        ids.iter().all(|id| verified_by_request.get(id) == Some(&1)),
        "exactly one verified event per link: {f}"
    );
    p.stop().await;
}

async fn outbox_rows(env: &TestEnv) -> i64 {
    let pool = sqlx::PgPool::connect(env.get("DATABASE_URL").unwrap_or_default())
        .await
        .expect("the test reaches its database");
    let n = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&pool)
        .await
        .expect("outbox count");
    pool.close().await;
    n
}

// ---------------------------------------------------------------------------
// 6. Poison
// ---------------------------------------------------------------------------

/// Bodies that are not CloudEvents at all: dead-lettered as `undecodable`.
fn undecodable(i: usize) -> Vec<u8> {
    match i % 10 {
        0 => b"not json at all".to_vec(),
        1 => b"{\"id\":\"truncated".to_vec(),
        2 => b"[1,2,3]".to_vec(),
        3 => b"null".to_vec(),
        4 => json!({"specversion": "1.0", "type": VERIFICATION_REQUESTED})
            .to_string()
            .into_bytes(),
        5 => json!({"id": i}).to_string().into_bytes(),
        6 => json!({"id": ""}).to_string().into_bytes(),
        7 => json!({"id": "x".repeat(129)}).to_string().into_bytes(),
        8 => vec![0xff, 0xfe, 0x00, 0x80, b'{', 0xc3],
        _ => Vec::new(),
    }
}

/// CloudEvents breaking one rule: answered `failed`/`invalid_request`, naming
/// the field.
fn invalid(id: &str, i: usize) -> (Vec<u8>, &'static str) {
    let mut event = json!({
        "specversion": "1.0", "id": id, "source": "/faults", "type": VERIFICATION_REQUESTED,
        "data": {"user_id": format!("u-{id}"), "email": format!("{id}@example.com")},
    });
    let field = match i % 10 {
        0 => {
            event["data"]["email"] = json!("not an address");
            "email"
        }
        1 => {
            event["data"]["user_id"] = json!(1.5);
            "user_id"
        }
        2 => {
            event["specversion"] = json!("0.3");
            "specversion"
        }
        3 => {
            event["type"] = json!("verimail.something.else");
            "type"
        }
        4 => {
            event["data"]["purpose"] = json!("delete_account");
            "purpose"
        }
        5 => {
            event["data"]["locale"] = json!("../../etc/passwd");
            "locale"
        }
        6 => {
            event["data"]["context"] = json!([1, 2]);
            "context"
        }
        7 => {
            event["data"]["name"] = json!("n".repeat(300));
            "name"
        }
        8 => {
            event["data"] = json!("a string");
            "data"
        }
        _ => {
            event["data"]["return_url"] = json!("javascript:alert(1)");
            "return_url"
        }
    };
    (event.to_string().into_bytes(), field)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_is_dead_lettered_or_answered_while_every_good_request_is_served() {
    const GOOD: usize = 200;
    const UNDECODABLE: usize = 500;
    const INVALID: usize = 500;
    const WARMUP: usize = 50;
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let p = Pipeline::start("poison", 1, false, |_| {}).await;
    let pid = p.workers[0].pid().expect("the worker runs");

    // Warm up with good requests, so the first measure is of a worker at work.
    let warm = p.publish_many("warm", WARMUP).await;
    assert!(
        p.tap.wait_answered(&warm, Duration::from_secs(45)).await,
        "{}",
        p.worker_logs()
    );
    let rss_before = rss_kib(pid);

    // Good, undecodable and invalid interleaved.
    let mut good = Vec::new();
    let mut bad_invalid = Vec::new();
    let mut messages: Vec<(String, Vec<u8>)> = Vec::new();
    for i in 0..(GOOD + UNDECODABLE + INVALID) {
        match i % 6 {
            0 if good.len() < GOOD => {
                let id = format!("good-{i:05}");
                messages.push((
                    id.clone(),
                    request_body(&id, &format!("u-good-{i}"), &format!("good{i}@example.com")),
                ));
                good.push(id);
            }
            1 | 3 | 5 if bad_invalid.len() < INVALID => {
                let id = format!("inv-{i:05}");
                let (body, field) = invalid(&id, bad_invalid.len());
                messages.push((id.clone(), body));
                bad_invalid.push((id, field));
            }
            _ => messages.push((format!("und-{i:05}"), undecodable(i))),
        }
    }
    let undecodable_sent = messages.len() - good.len() - bad_invalid.len();
    let pipeline = &p;
    futures_util::stream::iter(messages.iter())
        .for_each_concurrent(64, |(id, body)| async move {
            pipeline.publish_raw(id, body).await;
        })
        .await;
    let invalid_ids: Vec<String> = bad_invalid.iter().map(|(id, _)| id.clone()).collect();
    let good_done = p.tap.wait_answered(&good, Duration::from_secs(60)).await;
    let invalid_done = p
        .tap
        .wait_answered(&invalid_ids, Duration::from_secs(60))
        .await;
    quiesce(&p.env, Duration::from_secs(30)).await;
    let rss_after = rss_kib(pid);

    let dead = dead_letters(&p.env).await;
    let dead_undecodable = dead.iter().filter(|l| l["reason"] == "undecodable").count();
    let (code, replay_out, replay_err) = cli(&["dead", "replay", "--all"], &p.env).await;
    let dead_after_replay = dead_letters(&p.env).await.len();

    let mails = p.smtp.mails();
    let good_figures = Figures::measure("poison: good", &good, &p.tap, &mails);
    let mut f = Figures::measure("poison: invalid", &invalid_ids, &p.tap, &mails);
    let outcomes = p.tap.outcomes();
    let misnamed: Vec<String> = bad_invalid
        .iter()
        .filter(|(id, field)| {
            !outcomes.get(id).is_some_and(|l| {
                l.len() == 1
                    && l[0]["data"]["reason"] == "invalid_request"
                    && l[0]["data"]["detail"]
                        .as_str()
                        .is_some_and(|d| d.starts_with(&format!("{field}:")))
            })
        })
        .map(|(id, field)| format!("{id} ({field}): {:?}", outcomes.get(id)))
        .collect();
    let mails_for_bad = mails
        .iter()
        .filter(|m| !mail_request(m).starts_with("good-") && !mail_request(m).starts_with("warm-"))
        .count();
    f.note("good", &good_figures)
        .note("undecodable_published", undecodable_sent)
        .note("dead_letters", dead.len())
        .note("dead_undecodable", dead_undecodable)
        .note("dead_after_replay_all", dead_after_replay)
        .note("mails_for_bad", mails_for_bad)
        .note("rss_before_kib", rss_before)
        .note("rss_after_kib", rss_after)
        .note("total_s", format!("{:.1}", started.elapsed().as_secs_f64()));
    f.print();

    assert!(
        good_done && good_figures.lost == 0,
        "good requests lost: {f}\n{}",
        p.worker_logs()
    );
    assert_eq!(good_figures.outcomes.get("sent"), Some(&GOOD), "{f}");
    assert_eq!(
        (good_figures.mails, mails_for_bad),
        (GOOD + WARMUP, 0),
        "{f}"
    );
    assert!(invalid_done && f.lost == 0, "{f}");
    assert_eq!(
        f.outcomes.get("failed/invalid_request"),
        Some(&INVALID),
        "{f}"
    );
    assert!(
        misnamed.is_empty(),
        "details must name the field: {misnamed:?}"
    );
    assert_eq!(
        (dead.len(), dead_undecodable),
        (undecodable_sent, undecodable_sent),
        "{f}"
    );
    assert_eq!(
        code, 0,
        "replay --all with only undecodable letters: {replay_err}"
    );
    assert!(
        replay_out.trim().is_empty(),
        "nothing replayed: {replay_out}"
    );
    assert!(
        replay_err.contains(&format!("{undecodable_sent} undecodable")),
        "replay says how many stay: {replay_err}"
    );
    assert_eq!(
        dead_after_replay, undecodable_sent,
        "undecodable letters stay in place: {f}"
    );
    // Roughly flat: allocator caches may keep some, a leak per message would not fit.
    assert!(
        rss_after < rss_before + 48 * 1024,
        "worker memory grew from {rss_before} KiB to {rss_after} KiB: {f}"
    );
    p.stop().await;
}
