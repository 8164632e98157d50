//! Every exchange and queue name and argument, and their declarations.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, ExchangeKind};

use super::{DELIVERY_LIMIT, RETRY_DELAYS};
use crate::events::VERIFICATION_REQUESTED;

/// The names of one deployment's exchange and queues (`VERIMAIL_NAMESPACE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    ns: String,
}

impl Topology {
    /// The topology of namespace `ns`.
    pub fn new(ns: impl Into<String>) -> Self {
        Self { ns: ns.into() }
    }

    /// The topic exchange every event is published to.
    pub fn exchange(&self) -> &str {
        &self.ns
    }

    /// The quorum queue the workers consume requests from.
    pub fn worker_queue(&self) -> String {
        format!("{}.worker", self.ns)
    }

    /// The quorum queue of messages that could not be processed.
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.ns)
    }

    /// The retry queue holding messages for `delay` (one of [`RETRY_DELAYS`]).
    pub fn retry_queue(&self, delay: Duration) -> String {
        format!("{}.retry.{}s", self.ns, delay.as_secs())
    }

    /// A subscriber's durable queue, named after the subscriber.
    pub fn subscriber_queue(&self, subscriber: &str) -> String {
        format!("{}.sub.{subscriber}", self.ns)
    }
}

pub(super) fn field(v: impl Into<AMQPValue>) -> AMQPValue {
    v.into()
}

/// String arguments travel as AMQP long strings: RabbitMQ 3.10 cannot parse
/// lapin's short-string table values and drops the whole connection.
pub(super) fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

pub(super) fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(ShortString::from(*k), v.clone());
    }
    t
}

pub(super) fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

/// Declares only the namespace's exchange: a durable topic exchange with no
/// arguments, to which subscribers bind their own queues with routing keys
/// equal to event types (`verimail.#`). Publishers that own no queue (the
/// gateway) declare just this.
pub async fn declare_exchange(channel: &Channel, topology: &Topology) -> Result<(), lapin::Error> {
    channel
        .exchange_declare(
            topology.exchange().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

/// Declares the exchange, the worker queue, the dead-letter queue and the
/// retry queues of `topology`, idempotently (every component calls it at start).
pub async fn declare(channel: &Channel, topology: &Topology) -> Result<(), lapin::Error> {
    declare_exchange(channel, topology).await?;

    let dead = topology.dead_queue();
    // The dead-letter queue: quorum (replicated), nothing else; letters stay
    // until an operator lists and replays them.
    channel
        .queue_declare(
            dead.as_str().into(),
            durable(),
            table(&[("x-queue-type", long("quorum"))]),
        )
        .await?;

    let worker = topology.worker_queue();
    channel
        .queue_declare(
            worker.as_str().into(),
            durable(),
            table(&[
                // Quorum: replicated by Raft, survives the loss of a minority of nodes.
                ("x-queue-type", long("quorum")),
                // Poison that keeps crashing its consumer is moved aside
                // instead of looping; high because every return counts.
                (
                    "x-delivery-limit",
                    field(AMQPValue::LongLongInt(DELIVERY_LIMIT)),
                ),
                // Where the broker moves such poison: the default exchange, to `{ns}.dead`.
                ("x-dead-letter-exchange", long("")),
                ("x-dead-letter-routing-key", long(dead.as_str())),
                // Dead-lettering that waits for the target queue's confirm
                // instead of dropping on the way...
                ("x-dead-letter-strategy", long("at-least-once")),
                // ...which RabbitMQ only honours with reject-publish overflow
                // (otherwise it silently falls back to at-most-once).
                ("x-overflow", long("reject-publish")),
            ]),
        )
        .await?;
    channel
        .queue_bind(
            worker.as_str().into(),
            topology.exchange().into(),
            VERIFICATION_REQUESTED.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;

    for delay in RETRY_DELAYS {
        let name = topology.retry_queue(delay);
        let millis = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
        channel
            .queue_declare(
                name.as_str().into(),
                durable(),
                table(&[
                    // Quorum, so a node lost during a delayed retry loses nothing.
                    ("x-queue-type", long("quorum")),
                    // One queue per delay: quorum queues expire only at the
                    // head, so mixed delays in one queue would wait on each other.
                    ("x-message-ttl", field(AMQPValue::LongLongInt(millis))),
                    // On expiry, back to the worker queue through the default exchange.
                    ("x-dead-letter-exchange", long("")),
                    ("x-dead-letter-routing-key", long(worker.as_str())),
                    // Expired messages move only once the worker queue has them.
                    ("x-dead-letter-strategy", long("at-least-once")),
                    // Required by at-least-once dead-lettering (see above).
                    ("x-overflow", long("reject-publish")),
                ]),
            )
            .await?;
    }
    Ok(())
}

/// Declares a subscriber's durable quorum queue `{ns}.sub.{name}` and binds it
/// to the exchange with each of `patterns` (`verimail.email.verified`,
/// `verimail.#`). Returns the queue name.
pub async fn declare_subscriber(
    channel: &Channel,
    topology: &Topology,
    name: &str,
    patterns: &[&str],
) -> Result<String, lapin::Error> {
    let queue = topology.subscriber_queue(name);
    channel
        .queue_declare(
            queue.as_str().into(),
            durable(),
            // Quorum like every queue holding work: a subscriber's backlog
            // survives the loss of a broker node.
            table(&[("x-queue-type", long("quorum"))]),
        )
        .await?;
    for pattern in patterns {
        channel
            .queue_bind(
                queue.as_str().into(),
                topology.exchange().into(),
                (*pattern).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(queue)
}

/// Declares a server-named queue on `channel`, exclusive and auto-deleted (it
/// lives as long as the connection), bound to the exchange `exchange` with each
/// of `patterns`; returns its name. For listeners that must not leave a
/// backlog behind (`verimail listen`, the demo, the tests' and bench's taps).
pub async fn bind_temporary_queue(
    channel: &Channel,
    exchange: &str,
    patterns: &[&str],
) -> Result<ShortString, lapin::Error> {
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    for pattern in patterns {
        channel
            .queue_bind(
                queue.name().clone(),
                exchange.into(),
                (*pattern).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(queue.name().clone())
}
