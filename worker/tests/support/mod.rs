//! Test support: a namespace and database per test, the worker started
//! in-process through `Worker::build` + `run`, requests published with
//! confirms, outcomes captured on a queue of our own.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, ExchangeDeleteOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, message::Delivery};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use verimail_shared::bus::declare;
use verimail_shared::bus::{Bus, Outgoing, Publisher, RETRY_DELAYS, Topology};
use verimail_shared::config::Config;
use verimail_shared::events::{
    VERIFICATION_FAILED, VERIFICATION_REQUESTED, VERIFICATION_SENT, VERIFICATION_THROTTLED,
};
use verimail_worker::Worker;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const PG: &str = "postgres://postgres@127.0.0.1:5432";
pub const SECRET: &str = "test-secret-key-0123456789";

/// One test's namespace, database, outbox and settings.
#[derive(Debug)]
pub struct TestEnv {
    pub ns: String,
    pub db_name: String,
    pub outbox: PathBuf,
    pub topology: Topology,
    vars: HashMap<String, String>,
    bus: Arc<Bus>,
    pub publisher: Publisher,
}

impl TestEnv {
    /// A fresh namespace and database name; the file outbox by default.
    pub async fn new() -> Result<Self> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let ns = format!("t-{id}");
        let db_name = format!("verimail_w_{id}");
        let outbox = std::env::temp_dir().join(&ns);
        let mut vars = HashMap::new();
        for (k, v) in [
            ("AMQP_URL", AMQP_URL.to_owned()),
            ("DATABASE_URL", format!("{PG}/{db_name}")),
            ("VERIMAIL_NAMESPACE", ns.clone()),
            ("VERIMAIL_SECRET_KEY", SECRET.to_owned()),
            ("MAIL_URL", format!("file://{}", outbox.display())),
            ("METRICS_ADDR", "127.0.0.1:0".to_owned()),
            ("WORKER_CONCURRENCY", "8".to_owned()),
            ("RETURN_URL_ALLOWLIST", "https://app.example.com".to_owned()),
            ("PUBLIC_BASE_URL", "https://verify.example.com".to_owned()),
        ] {
            vars.insert(k.to_owned(), v);
        }
        let bus = Bus::connect_once(&[AMQP_URL.to_owned()], "worker-test").await?;
        let topology = Topology::new(ns.clone());
        let channel = bus.channel().await?;
        declare(&channel, &topology).await?;
        let _ = channel.close(200, "declared".into()).await;
        let publisher = Publisher::new(bus.clone());
        Ok(Self {
            ns,
            db_name,
            outbox,
            topology,
            vars,
            bus,
            publisher,
        })
    }

    /// Sets one configuration variable.
    pub fn set(&mut self, name: &str, value: impl Into<String>) -> &mut Self {
        self.vars.insert(name.to_owned(), value.into());
        self
    }

    /// The configuration the worker gets.
    pub fn config(&self) -> Result<Config> {
        let vars = self.vars.clone();
        Ok(Config::from_lookup(|name| vars.get(name).cloned())?)
    }

    /// Builds and runs a worker in this process.
    pub async fn start_worker(&self) -> Result<RunningWorker> {
        self.start_worker_with_lease(verimail_worker::LEASE).await
    }

    /// [`TestEnv::start_worker`] with a lease of `lease`.
    pub async fn start_worker_with_lease(&self, lease: Duration) -> Result<RunningWorker> {
        let worker = Worker::build_with_lease(self.config()?, lease).await?;
        let addr = worker.metrics_addr();
        let stop = CancellationToken::new();
        let handle = tokio::spawn(worker.run(stop.clone()));
        Ok(RunningWorker { addr, stop, handle })
    }

    /// A channel of the test's own.
    pub async fn channel(&self) -> Result<Channel> {
        Ok(self.bus.channel().await?)
    }

    /// Publishes a request body with `id` as message id; waits for the confirm.
    pub async fn publish_raw(&self, id: &str, body: &[u8], headers: FieldTable) -> Result<()> {
        let mut msg = Outgoing::event(&self.topology, VERIFICATION_REQUESTED, id, body);
        msg.headers = headers;
        self.publisher.publish(&msg).await?;
        Ok(())
    }

    /// Publishes a request event.
    pub async fn publish(&self, request: &Value) -> Result<()> {
        let id = request["id"].as_str().unwrap_or_default().to_owned();
        self.publish_raw(&id, request.to_string().as_bytes(), FieldTable::default())
            .await
    }

    /// Binds a capture queue for every outcome (bind before publishing).
    pub async fn capture(&self) -> Result<Capture> {
        let channel = self.channel().await?;
        // `verimail.verification.*` would match the requests too: bind the outcomes.
        let queue = verimail_shared::bus::bind_temporary_queue(
            &channel,
            self.topology.exchange(),
            &[
                VERIFICATION_SENT,
                VERIFICATION_THROTTLED,
                VERIFICATION_FAILED,
            ],
        )
        .await?;
        let mut consumer = channel
            .basic_consume(
                queue,
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let task = tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let value: Value = serde_json::from_slice(&delivery.data).unwrap_or(Value::Null);
                if let Ok(mut events) = sink.lock() {
                    events.push(value);
                }
            }
        });
        Ok(Capture {
            events,
            _channel: channel,
            task,
        })
    }

    /// Every message in `{ns}.dead`, taken off the queue.
    pub async fn drain_dead(&self) -> Result<Vec<Delivery>> {
        let channel = self.channel().await?;
        let mut out = Vec::new();
        while let Some(msg) = channel
            .basic_get(
                self.topology.dead_queue().as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await?
        {
            out.push(msg.delivery);
        }
        Ok(out)
    }

    /// Waits for `n` dead letters.
    pub async fn wait_for_dead(&self, n: usize, timeout: Duration) -> Result<Vec<Delivery>> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            got.extend(self.drain_dead().await?);
            if got.len() >= n || Instant::now() > deadline {
                return Ok(got);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Messages ready in queue `name` (passive declare).
    pub async fn queue_len(&self, name: &str) -> Result<u32> {
        let channel = self.channel().await?;
        let q = channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let _ = channel.close(200, "done".into()).await;
        Ok(q.message_count())
    }

    /// Waits until every retry queue is empty (deferred copies went back to the worker).
    pub async fn wait_for_retries_drained(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut total = 0;
            for d in RETRY_DELAYS {
                total += self.queue_len(&self.topology.retry_queue(d)).await?;
            }
            if total == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{total} messages still wait in retry queues");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Mails in the file outbox.
    pub fn outbox_mails(&self) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(&self.outbox) else {
            return Vec::new();
        };
        dir.filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .collect()
    }

    /// Waits until the outbox holds at least `n` mails.
    pub async fn wait_for_outbox(&self, n: usize, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let mails = self.outbox_mails();
            if mails.len() >= n || Instant::now() > deadline {
                return mails;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A database pool on the test's database.
    pub async fn pool(&self) -> Result<sqlx::PgPool> {
        Ok(verimail_shared::db::connect(
            &format!("{PG}/{}", self.db_name),
            true,
            verimail_shared::db::PoolSettings::default(),
        )
        .await?)
    }

    /// Deletes the namespace's queues and exchange, the database and the outbox.
    pub async fn cleanup(self) {
        if let Ok(channel) = self.bus.channel().await {
            let mut queues = vec![self.topology.worker_queue(), self.topology.dead_queue()];
            queues.extend(RETRY_DELAYS.iter().map(|d| self.topology.retry_queue(*d)));
            for q in queues {
                let _ = channel
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            let _ = channel
                .exchange_delete(
                    self.topology.exchange().into(),
                    ExchangeDeleteOptions::default(),
                )
                .await;
        }
        self.bus.close().await;
        if let Ok(pool) = sqlx::PgPool::connect(&format!("{PG}/postgres")).await {
            let drop = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.db_name);
            let _ = sqlx::query(sqlx::AssertSqlSafe(drop)).execute(&pool).await;
            pool.close().await;
        }
        let _ = std::fs::remove_dir_all(&self.outbox);
    }
}

/// A worker running in a task of this process.
#[derive(Debug)]
pub struct RunningWorker {
    pub addr: std::net::SocketAddr,
    pub stop: CancellationToken,
    pub handle: JoinHandle<Result<(), verimail_worker::Error>>,
}

impl RunningWorker {
    /// Cancels and waits for `run` to return (at most 30 s).
    pub async fn stop(self) -> Result<()> {
        self.stop.cancel();
        match tokio::time::timeout(Duration::from_secs(30), self.handle).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(e.into()),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => bail!("the worker did not stop within 30 s"),
        }
    }

    /// `GET path` on the metrics address: (status, body).
    pub async fn get(&self, path: &str) -> Result<(u16, String)> {
        http_get(self.addr, path).await
    }
}

/// `GET path` on `addr`, through the tests' one HTTP client: (status, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<(u16, String)> {
    let (status, _, body) = verimail_tests::http::get(&format!("http://{addr}{path}"), &[]).await?;
    Ok((status, body))
}

/// Outcomes seen on the capture queue.
#[derive(Debug)]
pub struct Capture {
    events: Arc<Mutex<Vec<Value>>>,
    _channel: Channel,
    task: JoinHandle<()>,
}

impl Capture {
    /// Every outcome so far.
    pub fn events(&self) -> Vec<Value> {
        self.events.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// Waits until at least `n` outcomes arrived, or `timeout`.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.events();
            if events.len() >= n || Instant::now() > deadline {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the outcome of request `id`.
    pub async fn outcome_of(&self, id: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self
                .events()
                .into_iter()
                .find(|e| e["data"]["request_id"] == id)
            {
                return Ok(e);
            }
            if Instant::now() > deadline {
                bail!("no outcome for {id} within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Outcomes of request `id`.
    pub fn outcomes_of(&self, id: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["data"]["request_id"] == id)
            .collect()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A valid request event.
pub fn request(user_id: &str, email: &str) -> Value {
    json!({
        "specversion": "1.0",
        "id": uuid::Uuid::now_v7().to_string(),
        "source": "/accounts",
        "type": VERIFICATION_REQUESTED,
        "time": "2026-11-24T10:00:00Z",
        "datacontenttype": "application/json",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "data": {"user_id": user_id, "email": email, "name": "Alice",
                 "locale": "en", "context": {"signup_flow": "b"}}
    })
}

/// A random user id.
pub fn user() -> String {
    format!("u-{}", uuid::Uuid::new_v4().simple())
}

/// A TCP proxy in front of PostgreSQL that a test can cut (an outage of the
/// database for the service behind it only; the real server is untouched).
pub struct Proxy {
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    up: Arc<std::sync::atomic::AtomicBool>,
    /// Bumped by `cut`: connections of an older generation close.
    generation: Arc<tokio::sync::watch::Sender<u64>>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// A proxy to `target`, forwarding.
    pub async fn start(target: &str) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let generation = Arc::new(tokio::sync::watch::channel(0u64).0);
        let (target, flag, gen_tx) = (target.to_owned(), up.clone(), generation.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !flag.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let target = target.clone();
                let mut cut = gen_tx.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Ok(Self {
            addr,
            up,
            generation,
            task,
        })
    }

    /// Cuts every connection and refuses new ones until [`Proxy::resume`].
    pub fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Forwards again.
    pub fn resume(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
