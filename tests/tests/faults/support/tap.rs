//! A tap that survives a broker restart: the events the services emit, each
//! counted once by id, so a scenario can tell a lost outcome from a copy.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use verimail_shared::bus::{self, Topology};
use verimail_shared::events::{
    EMAIL_VERIFIED, VERIFICATION_FAILED, VERIFICATION_SENT, VERIFICATION_THROTTLED,
};
use verimail_tests::env::TestEnv;

use super::lock;

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
pub struct Tap {
    seen: Arc<Mutex<Seen>>,
    stop: CancellationToken,
    queue: String,
    url: String,
}

impl Tap {
    /// Declares the topology and the tap's queue (so outcomes have somewhere to
    /// go before any service starts), then consumes in the background.
    pub async fn start(env: &TestEnv) -> Self {
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
    pub fn extra_copies(&self) -> usize {
        let seen = lock(&self.seen);
        seen.copies - seen.events.len()
    }

    /// Distinct outcome events per request id.
    pub fn outcomes(&self) -> HashMap<String, Vec<Value>> {
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
    pub fn verified(&self) -> HashMap<String, usize> {
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
    pub fn answered(&self, ids: &[String]) -> usize {
        let outcomes = self.outcomes();
        ids.iter().filter(|id| outcomes.contains_key(*id)).count()
    }

    /// Waits until every one of `ids` has an outcome, or `timeout`.
    pub async fn wait_answered(&self, ids: &[String], timeout: Duration) -> bool {
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
    pub async fn wait_verified(&self, n: usize, timeout: Duration) -> bool {
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

    pub async fn stop(&self, env: &TestEnv) {
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
pub fn outcome_label(e: &Value) -> String {
    match e["type"].as_str() {
        Some(VERIFICATION_SENT) => "sent".into(),
        Some(VERIFICATION_THROTTLED) => "throttled".into(),
        Some(VERIFICATION_FAILED) => {
            format!("failed/{}", e["data"]["reason"].as_str().unwrap_or("?"))
        }
        other => format!("{other:?}"),
    }
}
