//! Captures the events of a namespace: an exclusive queue bound to `{ns}`
//! whose messages are collected in memory, for tests to wait on.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use serde_json::Value;

/// Events seen on the bus, in arrival order.
#[derive(Debug, Clone)]
pub struct EventTap {
    events: Arc<Mutex<Vec<Value>>>,
    /// The broker's name for the tap's queue (server-named).
    queue: String,
    _conn: Arc<lapin::Connection>,
}

impl EventTap {
    /// Binds a tap to `namespace` for `patterns` (e.g. `verimail.#`). The
    /// exchange is declared first, so the tap may start before any service.
    pub async fn start(amqp_url: &str, namespace: &str, patterns: &[&str]) -> anyhow::Result<Self> {
        let conn =
            lapin::Connection::connect(amqp_url, lapin::ConnectionProperties::default()).await?;
        let ch = conn.create_channel().await?;
        verimail_shared::bus::declare(&ch, &verimail_shared::bus::Topology::new(namespace)).await?;
        let queue = verimail_shared::bus::bind_temporary_queue(&ch, namespace, patterns).await?;
        let queue_name = queue.to_string();
        let mut consumer = ch
            .basic_consume(
                queue,
                "tap".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let value = serde_json::from_slice(&delivery.data).unwrap_or(Value::Null);
                if let Ok(mut v) = sink.lock() {
                    v.push(value);
                }
                let _ = delivery.ack(BasicAckOptions::default()).await;
            }
        });
        Ok(Self {
            events,
            queue: queue_name,
            _conn: Arc::new(conn),
        })
    }

    /// A tap on every event (`verimail.#`) of `env`'s namespace.
    pub async fn everything(env: &crate::env::TestEnv) -> Self {
        Self::start(
            env.get("AMQP_URL").unwrap_or_default(),
            &env.namespace,
            &["verimail.#"],
        )
        .await
        .expect("event tap")
    }

    /// The broker's name for the tap's queue.
    pub fn queue_name(&self) -> &str {
        &self.queue
    }

    /// Every event so far.
    pub fn all(&self) -> Vec<Value> {
        self.events.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Events of one `type`.
    pub fn of_type(&self, ty: &str) -> Vec<Value> {
        self.all().into_iter().filter(|e| e["type"] == ty).collect()
    }

    /// Waits until `pred` holds over the events, or `timeout`; returns the events then.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        pred: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let now = self.all();
            if pred(&now) || tokio::time::Instant::now() >= deadline {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for `n` events of type `ty`.
    pub async fn wait_for(&self, ty: &str, n: usize, timeout: Duration) -> Vec<Value> {
        self.wait_until(timeout, |all| {
            all.iter().filter(|e| e["type"] == ty).count() >= n
        })
        .await;
        self.of_type(ty)
    }
}

/// Polls `f` until it returns `Some`, or `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
