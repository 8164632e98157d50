//! The dead-letter queue `{ns}.dead`: listing its letters without consuming
//! them, and replaying them to the exchange.
//!
//! Both read the queue with `basic.get` on a channel of their own and never
//! acknowledge what they only look at: closing that channel hands every
//! unacknowledged letter back to the queue, in its place. Only a letter whose
//! copy the broker has confirmed is acknowledged, and so removed.

use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use serde::Serialize;
use serde_json::Value;
use verimail_shared::bus::{self, Bus, BusError, Outgoing, Publisher, SETUP_TIMEOUT, Topology};
use verimail_shared::events;

/// Header set to `true` on every copy `verimail dead replay` publishes, so the
/// worker serves again a request whose earlier outcome was `delivery_failed`.
pub use verimail_shared::bus::HEADER_REPLAYED;

/// The reason code of letters that are not CloudEvents at all.
const UNDECODABLE: &str = "undecodable";

/// Failures reading or replaying the dead-letter queue.
#[derive(Debug, thiserror::Error)]
pub enum DeadError {
    /// The broker could not be reached.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// A protocol error while reading the queue.
    #[error(transparent)]
    Amqp(#[from] lapin::Error),
}

/// What `verimail dead list` prints for one letter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    /// The CloudEvent `id`, `null` when the body has no readable id.
    pub id: Option<String>,
    /// The CloudEvent `type` (or the AMQP `type` property when the body has none).
    #[serde(rename = "type")]
    pub ty: Option<String>,
    /// Why it is here: `x-verimail-reason`, or the broker's `x-first-death-reason`.
    pub reason: Option<String>,
    /// `x-verimail-detail`, or which queue the broker moved it from.
    pub detail: Option<String>,
    /// Body size in bytes.
    pub bytes: usize,
}

impl DeadLetter {
    /// Reads a letter's id, type and reason from its body and headers.
    pub fn from_delivery(delivery: &Delivery) -> Self {
        let (reason, detail) = bus::dead_letter_reason(delivery.properties.headers().as_ref());
        let body_type = serde_json::from_slice::<Value>(&delivery.data)
            .ok()
            .and_then(|v| v.get("type").and_then(Value::as_str).map(str::to_owned));
        let ty = body_type.or_else(|| {
            delivery
                .properties
                .kind()
                .as_ref()
                .map(|k| k.as_str().to_owned())
        });
        Self {
            id: events::peek_id(&delivery.data),
            ty: ty.filter(|t| !t.is_empty()),
            reason,
            detail,
            bytes: delivery.data.len(),
        }
    }

    /// Whether it can be replayed: it has an id and a type, and was not
    /// dead-lettered as undecodable (it would only come back).
    pub fn replayable(&self) -> bool {
        self.id.is_some() && self.ty.is_some() && self.reason.as_deref() != Some(UNDECODABLE)
    }
}

/// Which letters to replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every letter with this CloudEvent id (also its AMQP `message_id`).
    Id(String),
    /// Every replayable letter.
    All,
}

/// What a replay did.
#[derive(Debug, Default)]
pub struct ReplayReport {
    /// Letters whose copy the broker confirmed; removed from `{ns}.dead`.
    pub replayed: Vec<DeadLetter>,
    /// Selected letters that cannot be replayed (undecodable); left in place.
    pub unreplayable: Vec<DeadLetter>,
    /// Letters whose copy was not confirmed, with why; left in place.
    pub failed: Vec<(DeadLetter, BusError)>,
    /// How many letters matched the selection (`--id`), replayable or not.
    pub matched: usize,
}

/// Takes every letter present now, unacknowledged, on `channel`. Letters that
/// arrive meanwhile are not taken, so a replay that makes new letters ends.
async fn take_all(channel: &Channel, queue: &str) -> Result<Vec<Delivery>, lapin::Error> {
    let mut letters = Vec::new();
    let mut remaining: Option<u32> = None;
    while remaining != Some(0) {
        let Some(message) = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        // The first answer says how many were behind it: take exactly those.
        remaining = Some(match remaining {
            None => message.message_count,
            Some(n) => n.saturating_sub(1),
        });
        letters.push(message.delivery);
    }
    Ok(letters)
}

async fn open(bus: &Bus, topology: &Topology) -> Result<Channel, DeadError> {
    let open = async {
        let channel = bus.channel().await?;
        // The queue may not exist yet in a fresh namespace.
        verimail_shared::bus::declare(&channel, topology).await?;
        Ok(channel)
    };
    bus.within("declaring the topology", SETUP_TIMEOUT, open)
        .await
}

/// Lists the letters in `{ns}.dead`, oldest first, leaving every one in place.
pub async fn list(bus: &Bus, topology: &Topology) -> Result<Vec<DeadLetter>, DeadError> {
    let channel = open(bus, topology).await?;
    let taken = take_all(&channel, &topology.dead_queue()).await;
    // Closing the channel hands every letter back, unacknowledged.
    let closed = channel.close(200, "listed".into()).await;
    let letters = taken?;
    closed?;
    Ok(letters.iter().map(DeadLetter::from_delivery).collect())
}

/// Re-publishes the selected letters to `{ns}` with their type as routing
/// key (with the header [`HEADER_REPLAYED`]), removing each from `{ns}.dead`
/// once the broker has confirmed its copy. `on_replayed` is called for each,
/// as it happens.
pub async fn replay(
    publisher: &Publisher,
    topology: &Topology,
    selection: &Selection,
    mut on_replayed: impl FnMut(&DeadLetter),
) -> Result<ReplayReport, DeadError> {
    let channel = open(publisher.bus(), topology).await?;
    let result = replay_on(&channel, publisher, topology, selection, &mut on_replayed).await;
    // Hands back every letter not replayed.
    let closed = channel.close(200, "replayed".into()).await;
    let report = result?;
    if let Err(e) = closed {
        tracing::warn!(error = %e, "closing the dead-letter channel failed");
    }
    Ok(report)
}

async fn replay_on(
    channel: &Channel,
    publisher: &Publisher,
    topology: &Topology,
    selection: &Selection,
    on_replayed: &mut impl FnMut(&DeadLetter),
) -> Result<ReplayReport, DeadError> {
    let mut report = ReplayReport::default();
    for delivery in take_all(channel, &topology.dead_queue()).await? {
        let letter = DeadLetter::from_delivery(&delivery);
        let selected = match selection {
            Selection::All => true,
            Selection::Id(id) => letter.id.as_deref() == Some(id.as_str()),
        };
        if !selected {
            continue;
        }
        report.matched += 1;
        let (true, Some(id), Some(ty)) = (letter.replayable(), &letter.id, &letter.ty) else {
            report.unreplayable.push(letter);
            continue;
        };
        let copy = Outgoing {
            exchange: topology.exchange(),
            routing_key: ty,
            message_id: id,
            kind: Some(ty),
            body: &delivery.data,
            headers: bus::replay_headers(delivery.properties.headers().as_ref()),
        };
        match publisher.publish(&copy).await {
            Ok(()) => {
                // Only now is the copy safe: remove the letter.
                delivery.ack(BasicAckOptions::default()).await?;
                on_replayed(&letter);
                report.replayed.push(letter);
            }
            Err(e) => {
                tracing::warn!(id = %id, error = %e, "replay not confirmed; the letter stays");
                report.failed.push((letter, e));
            }
        }
    }
    Ok(report)
}
