//! The tap: a subscriber's durable quorum queue, consumed through
//! reconnections, deduplicated by event id and by request id, so a lost
//! outcome and a doubled one can be told apart from the tap's own redeliveries.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_util::sync::CancellationToken;
use verimail_shared::bus::Bus;
use verimail_shared::events::EMAIL_VERIFIED;

/// What the tap saw, deduplicated by event id and by request id.
#[derive(Debug, Default)]
pub struct Seen {
    /// Every event id seen.
    pub ids: HashSet<String>,
    /// Outcome event ids per request id.
    pub outcomes: HashMap<String, HashSet<String>>,
    /// Outcome type per request id (the first seen).
    pub outcome_type: HashMap<String, String>,
    /// When the tap first saw an outcome of each request (arrival order).
    pub outcome_arrivals: Vec<Instant>,
    /// The `time` attribute of each request's first outcome (worker's clock).
    pub outcome_times: Vec<OffsetDateTime>,
    /// Verified event ids per request id.
    pub verified: HashMap<String, HashSet<String>>,
    /// When the tap saw the last new verified event.
    pub last_verified_at: Option<Instant>,
    /// Outcome events whose id was seen before: at-least-once re-sends.
    pub outcome_same_id: u64,
    /// Verified events whose id was seen before.
    pub verified_same_id: u64,
    /// Deliveries the broker handed the tap again (the tap lost its channel
    /// before acking): not the pipeline's doing, not counted above.
    pub tap_redeliveries: u64,
    /// Bodies the tap could not read.
    pub unreadable: u64,
}

impl Seen {
    fn record(&mut self, d: &Delivery) {
        let Ok(event) = serde_json::from_slice::<Value>(&d.data) else {
            self.unreadable += 1;
            return;
        };
        let id = event["id"].as_str().unwrap_or_default().to_owned();
        let ty = event["type"].as_str().unwrap_or_default().to_owned();
        let request_id = event["data"]["request_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let fresh = self.ids.insert(id.clone());
        if !fresh && d.redelivered {
            self.tap_redeliveries += 1;
            return;
        }
        if ty == EMAIL_VERIFIED {
            if fresh {
                self.last_verified_at = Some(Instant::now());
            } else {
                self.verified_same_id += 1;
            }
            self.verified.entry(request_id).or_default().insert(id);
            return;
        }
        if !fresh {
            self.outcome_same_id += 1;
            return;
        }
        let ids = self.outcomes.entry(request_id.clone()).or_default();
        let first = ids.is_empty();
        ids.insert(id);
        if first {
            self.outcome_type.insert(request_id, ty);
            self.outcome_arrivals.push(Instant::now());
            if let Some(t) = event["time"]
                .as_str()
                .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
            {
                self.outcome_times.push(t);
            }
        }
    }
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Consumes `queue` until `stop`, on whatever node `bus` reaches, recording
/// each event before acking it; a lost channel or node means a new channel.
pub async fn run_tap(
    bus: Arc<Bus>,
    queue: String,
    seen: Arc<Mutex<Seen>>,
    reconnects: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    while !stop.is_cancelled() {
        let session = async {
            let ch = bus.channel().await?;
            ch.basic_qos(512, BasicQosOptions::default()).await?;
            let mut consumer = ch
                .basic_consume(
                    queue.as_str().into(),
                    "cluster-tap".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            while let Some(delivery) = consumer.next().await {
                let delivery = delivery?;
                lock(&seen).record(&delivery);
                delivery.ack(BasicAckOptions::default()).await?;
            }
            anyhow::Ok(())
        };
        tokio::select! {
            r = session => {
                if r.is_err() {
                    // Channel errors do not always tell the connection is gone:
                    // forget it, the next channel() connects to a live node.
                    bus.forget().await;
                }
                reconnects.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            () = stop.cancelled() => break,
        }
    }
}
