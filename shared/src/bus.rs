//! The bus: every exchange and queue name and argument, declared in one place
//! ([`declare`]), connections that survive a lost node ([`Bus`]), and a
//! publisher that only reports success once the broker has confirmed
//! ([`Publisher`]).
//!
//! Nothing outside this module spells a queue name.

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use rand::seq::SliceRandom;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::config::redact;
use crate::events::{CONTENT_TYPE, VERIFICATION_REQUESTED};

/// Header naming why the worker dead-lettered a message (a code).
pub const HEADER_REASON: &str = "x-verimail-reason";
/// Header with the human-readable detail of a dead letter.
pub const HEADER_DETAIL: &str = "x-verimail-detail";
/// Header `verimail dead replay` sets (AMQP boolean `true`) on every copy it
/// re-publishes, so the worker treats the request as a fresh attempt.
pub const HEADER_REPLAYED: &str = "x-verimail-replayed";
/// Header the worker sets on a request it sends to a retry queue, counting
/// delayed redeliveries (the database holds the authoritative attempt count).
pub const HEADER_RETRY: &str = "x-verimail-retry";

/// Delays of the retry queues, growing; a transient failure waits in the
/// first tier whose delay fits the time left in the retry window.
pub const RETRY_DELAYS: [Duration; 4] = [
    Duration::from_secs(5),
    Duration::from_secs(30),
    Duration::from_secs(120),
    Duration::from_secs(600),
];

/// How many times the broker redelivers one message before moving it to
/// `{ns}.dead`. Every return counts (a nack, a consumer that closes without
/// ack, a node lost), so graceful shutdowns and failovers use it up too: it is
/// set high, for real poison (a message that crashes its consumer) only.
pub const DELIVERY_LIMIT: i64 = 50;

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

/// Failures talking to the broker.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// A protocol or I/O error from lapin.
    #[error(transparent)]
    Amqp(#[from] lapin::Error),
    /// No node in `AMQP_URL` answered.
    #[error("no RabbitMQ node answered ({tried}): {last}")]
    Unreachable {
        /// The redacted URLs tried.
        tried: String,
        /// The last error seen.
        #[source]
        last: lapin::Error,
    },
    /// Shutdown was requested while waiting for the broker.
    #[error("shutting down")]
    Cancelled,
    /// The broker refused to take the message (a nack).
    #[error("the broker refused the message (nack)")]
    Nacked,
    /// The message matched no queue (returned to the publisher as mandatory).
    #[error("the message was returned unroutable: {0}")]
    Unroutable(String),
}

impl BusError {
    /// Whether a retry later may succeed (everything but shutdown).
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Self::Cancelled)
    }
}

fn field(v: impl Into<AMQPValue>) -> AMQPValue {
    v.into()
}

/// String arguments travel as AMQP long strings: RabbitMQ 3.10 cannot parse
/// lapin's short-string table values and drops the whole connection.
fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(ShortString::from(*k), v.clone());
    }
    t
}

fn durable() -> QueueDeclareOptions {
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

/// A connection to one node of the cluster named by `AMQP_URL`, re-made on
/// another node when it is lost.
#[derive(Debug)]
pub struct Bus {
    urls: Vec<String>,
    name: String,
    connection: Mutex<Option<Arc<Connection>>>,
    shutdown: CancellationToken,
}

impl Bus {
    /// Connects to one of `urls` (shuffled, so clients spread over the nodes),
    /// retrying with backoff until a node answers or `shutdown` fires.
    /// `name` shows in the RabbitMQ management UI.
    pub async fn connect(
        urls: &[String],
        name: &str,
        shutdown: &CancellationToken,
    ) -> Result<Arc<Self>, BusError> {
        let bus = Arc::new(Self {
            urls: urls.to_vec(),
            name: name.to_owned(),
            connection: Mutex::new(None),
            shutdown: shutdown.clone(),
        });
        bus.connection().await?;
        Ok(bus)
    }

    /// Tries each node once, in shuffled order, and gives up (for the CLI,
    /// which should fail fast with exit 1 rather than wait forever).
    pub async fn connect_once(urls: &[String], name: &str) -> Result<Arc<Self>, BusError> {
        let connection = connect_any(urls, name).await?;
        Ok(Arc::new(Self {
            urls: urls.to_vec(),
            name: name.to_owned(),
            connection: Mutex::new(Some(Arc::new(connection))),
            shutdown: CancellationToken::new(),
        }))
    }

    /// The live connection, reconnecting (with backoff, to any node) when it was lost.
    pub async fn connection(&self) -> Result<Arc<Connection>, BusError> {
        let mut slot = self.connection.lock().await;
        if let Some(conn) = slot.as_ref()
            && conn.status().connected()
        {
            return Ok(conn.clone());
        }
        let attempt = || connect_any(&self.urls, &self.name);
        let retry = attempt
            .retry(
                ExponentialBuilder::default()
                    .with_jitter()
                    .with_min_delay(Duration::from_millis(200))
                    .with_max_delay(Duration::from_secs(5))
                    .without_max_times(),
            )
            .notify(|e, wait| {
                tracing::warn!(error = %e, retry_in = ?wait, "RabbitMQ unreachable, retrying");
            });
        let conn = tokio::select! {
            conn = retry => conn?,
            () = self.shutdown.cancelled() => return Err(BusError::Cancelled),
        };
        let conn = Arc::new(conn);
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// A fresh channel on the live connection.
    pub async fn channel(&self) -> Result<Channel, BusError> {
        let conn = self.connection().await?;
        match conn.create_channel().await {
            Ok(ch) => Ok(ch),
            Err(e) => {
                // The connection looked alive but is not: forget it so the
                // next call reconnects.
                self.forget().await;
                Err(e.into())
            }
        }
    }

    /// Forgets the current connection (it failed); the next call reconnects.
    pub async fn forget(&self) {
        *self.connection.lock().await = None;
    }

    /// Closes the connection (at shutdown).
    pub async fn close(&self) {
        if let Some(conn) = self.connection.lock().await.take() {
            let _ = conn.close(200, "shutdown".into()).await;
        }
    }
}

async fn connect_any(urls: &[String], name: &str) -> Result<Connection, BusError> {
    let mut order: Vec<&String> = urls.iter().collect();
    order.shuffle(&mut rand::rng());
    let mut last = None;
    for url in &order {
        tracing::info!(url = %redact(url), "connecting to RabbitMQ");
        let props = ConnectionProperties::default().with_connection_name(name.into());
        match tokio::time::timeout(Duration::from_secs(10), Connection::connect(url, props)).await {
            Ok(Ok(conn)) => {
                tracing::info!(url = %redact(url), "connected to RabbitMQ");
                return Ok(conn);
            }
            Ok(Err(e)) => {
                tracing::warn!(url = %redact(url), error = %e, "RabbitMQ node did not answer");
                last = Some(e);
            }
            Err(_) => {
                tracing::warn!(url = %redact(url), "RabbitMQ node timed out");
                last = Some(lapin::Error::from(
                    lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed),
                ));
            }
        }
    }
    let tried = order
        .iter()
        .map(|u| redact(u))
        .collect::<Vec<_>>()
        .join(", ");
    Err(BusError::Unreachable {
        tried,
        last: last.unwrap_or_else(|| {
            lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(
                lapin::ConnectionState::Closed,
            ))
        }),
    })
}

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    /// Exchange (`""` for the default exchange, used by retry and dead queues).
    pub exchange: &'a str,
    /// Routing key: the event type, or a queue name on the default exchange.
    pub routing_key: &'a str,
    /// AMQP `message_id` (the CloudEvent id).
    pub message_id: &'a str,
    /// AMQP `type` (the CloudEvent type), when known.
    pub kind: Option<&'a str>,
    /// The body.
    pub body: &'a [u8],
    /// Extra headers.
    pub headers: FieldTable,
}

impl<'a> Outgoing<'a> {
    /// A CloudEvent to the namespace's exchange, routed by its type.
    pub fn event(topology: &'a Topology, ty: &'a str, id: &'a str, body: &'a [u8]) -> Self {
        Self {
            exchange: topology.exchange(),
            routing_key: ty,
            message_id: id,
            kind: Some(ty),
            body,
            headers: FieldTable::default(),
        }
    }
}

/// Publishes persistent, mandatory messages on a confirm channel and reports
/// success only after the broker's ack. Many publishes may wait for their
/// confirms at once; a failed channel is replaced on the next publish.
#[derive(Debug)]
pub struct Publisher {
    bus: Arc<Bus>,
    channel: Mutex<Option<Channel>>,
}

impl Publisher {
    /// A publisher on `bus`.
    pub fn new(bus: Arc<Bus>) -> Self {
        Self {
            bus,
            channel: Mutex::new(None),
        }
    }

    /// The bus it publishes on.
    pub fn bus(&self) -> &Arc<Bus> {
        &self.bus
    }

    async fn confirm_channel(&self) -> Result<Channel, BusError> {
        let mut slot = self.channel.lock().await;
        if let Some(ch) = slot.as_ref()
            && ch.status().connected()
        {
            return Ok(ch.clone());
        }
        let ch = self.bus.channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        *slot = Some(ch.clone());
        Ok(ch)
    }

    /// Closes the channel and waits for the broker's answer. Call it before
    /// closing the connection: a channel left to close itself on drop races
    /// the connection's close, and lapin logs that race as an ERROR.
    pub async fn close(&self) {
        if let Some(channel) = self.channel.lock().await.take()
            && channel.status().connected()
        {
            let _ = channel.close(200, "shutdown".into()).await;
        }
    }

    async fn drop_channel(&self, failed: &Channel) {
        let mut slot = self.channel.lock().await;
        if slot.as_ref().is_some_and(|c| c.id() == failed.id()) {
            *slot = None;
        }
    }

    /// Publishes once; `Ok` means the broker confirmed and some queue took it.
    pub async fn publish(&self, msg: &Outgoing<'_>) -> Result<(), BusError> {
        let channel = self.confirm_channel().await?;
        let mut props = BasicProperties::default()
            .with_content_type(CONTENT_TYPE.into())
            .with_delivery_mode(2)
            .with_message_id(msg.message_id.into())
            .with_headers(msg.headers.clone());
        if let Some(kind) = msg.kind {
            props = props.with_type(kind.into());
        }
        let outcome = async {
            channel
                .basic_publish(
                    msg.exchange.into(),
                    msg.routing_key.into(),
                    // Mandatory: a message no queue takes comes back, and is a
                    // failure, instead of being confirmed and dropped.
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    msg.body,
                    props,
                )
                .await?
                .await
        };
        let confirmation = match tokio::time::timeout(Duration::from_secs(30), outcome).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                self.drop_channel(&channel).await;
                return Err(e.into());
            }
            Err(_) => {
                // No confirm within 30 s: treat the channel as broken.
                self.drop_channel(&channel).await;
                return Err(BusError::Nacked);
            }
        };
        if confirmation.is_nack() {
            // Persistent nacks can poison a channel after a leader change: start afresh.
            self.drop_channel(&channel).await;
            return Err(BusError::Nacked);
        }
        if let Some(returned) = confirmation.take_message() {
            return Err(BusError::Unroutable(returned.reply_text.to_string()));
        }
        Ok(())
    }

    /// Publishes until the broker confirms, retrying with backoff through
    /// reconnections; gives up only on shutdown.
    pub async fn publish_until_confirmed(
        &self,
        msg: &Outgoing<'_>,
        shutdown: &CancellationToken,
    ) -> Result<(), BusError> {
        let attempt = || self.publish(msg);
        let retry = attempt
            .retry(
                ExponentialBuilder::default()
                    .with_jitter()
                    .with_min_delay(Duration::from_millis(100))
                    .with_max_delay(Duration::from_secs(5))
                    .without_max_times(),
            )
            .when(BusError::is_retryable)
            .notify(|e, wait| {
                tracing::warn!(error = %e, retry_in = ?wait, "publish failed, retrying");
            });
        tokio::select! {
            r = retry => r,
            () = shutdown.cancelled() => Err(BusError::Cancelled),
        }
    }
}

/// Reads a string header (`x-verimail-reason`, `x-first-death-reason`...).
pub fn header_str(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    let value = headers?.inner().get(name)?;
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// Headers for a letter the worker moves to `{ns}.dead` itself.
pub fn dead_letter_headers(reason: &str, detail: &str) -> FieldTable {
    // Header values are bounded so a huge detail cannot bloat every letter.
    let detail: String = detail.chars().take(1024).collect();
    table(&[
        (HEADER_REASON, AMQPValue::LongString(reason.into())),
        (HEADER_DETAIL, AMQPValue::LongString(detail.as_str().into())),
    ])
}

/// Headers for a dead letter's replayed copy: the letter's own headers (the
/// worker reads `x-verimail-failed-outcome` from them to reopen a request that
/// failed with `delivery_failed`) without the dead-lettering ones, plus
/// [`HEADER_REPLAYED`].
pub fn replay_headers(letter: Option<&FieldTable>) -> FieldTable {
    let mut headers = FieldTable::default();
    if let Some(original) = letter {
        for (key, value) in original.inner() {
            let k = key.as_str();
            let dead_lettering = k == HEADER_REASON
                || k == HEADER_DETAIL
                || k.starts_with("x-death")
                || k.starts_with("x-first-death")
                || k.starts_with("x-last-death");
            if !dead_lettering {
                headers.insert(key.clone(), value.clone());
            }
        }
    }
    headers.insert(HEADER_REPLAYED.into(), AMQPValue::Boolean(true));
    headers
}

/// Why a dead letter is in `{ns}.dead`: our header, or the broker's own
/// `x-first-death-reason` (e.g. `delivery_limit`) when the broker moved it.
pub fn dead_letter_reason(headers: Option<&FieldTable>) -> (Option<String>, Option<String>) {
    let reason =
        header_str(headers, HEADER_REASON).or_else(|| header_str(headers, "x-first-death-reason"));
    let detail = header_str(headers, HEADER_DETAIL).or_else(|| {
        header_str(headers, "x-first-death-queue").map(|q| format!("moved by the broker from {q}"))
    });
    (reason, detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_derive_from_the_namespace() {
        let t = Topology::new("acme");
        assert_eq!(t.exchange(), "acme");
        assert_eq!(t.worker_queue(), "acme.worker");
        assert_eq!(t.dead_queue(), "acme.dead");
        assert_eq!(t.retry_queue(RETRY_DELAYS[0]), "acme.retry.5s");
    }

    #[test]
    fn a_replayed_copy_keeps_the_letters_headers_but_not_its_death() {
        let letter = table(&[
            (
                "x-verimail-failed-outcome",
                AMQPValue::LongString("o-1".into()),
            ),
            (
                HEADER_REASON,
                AMQPValue::LongString("delivery_failed".into()),
            ),
            (HEADER_DETAIL, AMQPValue::LongString("451".into())),
            (
                "x-first-death-reason",
                AMQPValue::LongString("rejected".into()),
            ),
        ]);
        let copy = replay_headers(Some(&letter));
        assert_eq!(
            header_str(Some(&copy), "x-verimail-failed-outcome").as_deref(),
            Some("o-1")
        );
        assert_eq!(header_str(Some(&copy), HEADER_REASON), None);
        assert_eq!(header_str(Some(&copy), "x-first-death-reason"), None);
        assert_eq!(
            copy.inner().get(HEADER_REPLAYED),
            Some(&AMQPValue::Boolean(true))
        );
    }

    #[test]
    fn a_broker_dead_letter_reads_its_reason_from_x_first_death_reason() {
        let headers = table(&[
            (
                "x-first-death-reason",
                AMQPValue::LongString("delivery_limit".into()),
            ),
            (
                "x-first-death-queue",
                AMQPValue::LongString("ns.worker".into()),
            ),
        ]);
        let (reason, detail) = dead_letter_reason(Some(&headers));
        assert_eq!(reason.as_deref(), Some("delivery_limit"));
        assert_eq!(
            detail.as_deref(),
            Some("moved by the broker from ns.worker")
        );
        let ours = dead_letter_headers("undecodable", "not JSON");
        assert_eq!(
            dead_letter_reason(Some(&ours)),
            (Some("undecodable".into()), Some("not JSON".into()))
        );
    }
}
