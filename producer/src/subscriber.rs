//! [`Subscriber`]: a durable queue of one's own, bound to the namespace's
//! exchange, yielding decoded events to acknowledge once handled.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use tokio_util::sync::CancellationToken;
use verimail_shared::Config;
use verimail_shared::bus::{self, Bus, BusError, Topology};
use verimail_shared::events::{Event, EventError};

/// Messages handed to one subscriber before it acknowledges any.
const DEFAULT_PREFETCH: u16 = 16;

/// Failures while subscribing.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    /// The broker could not be reached.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// A protocol error (declaring, binding, consuming, acknowledging).
    #[error(transparent)]
    Amqp(#[from] lapin::Error),
    /// A message that is not a verimail event; it was rejected (dropped), as
    /// redelivering it could never succeed.
    #[error("message {message_id:?} is not a verimail event: {source}")]
    Undecodable {
        /// Its AMQP `message_id`, when it had one.
        message_id: Option<String>,
        /// Why it did not decode.
        #[source]
        source: EventError,
    },
    /// The queue or subscriber name is not usable.
    #[error("invalid subscriber name `{0}`: use 1-100 characters of A-Z a-z 0-9 . - _")]
    InvalidName(String),
}

/// A durable quorum queue named `{ns}.sub.{name}`, bound to `{ns}` with
/// routing-key patterns (`verimail.email.verified`, `verimail.verification.*`,
/// `verimail.#`), consumed with manual acknowledgements.
///
/// Events arrive at least once: deduplicate on the CloudEvent `id`
/// (a re-sent `verimail.email.verified` carries the same id). The subscriber
/// reconnects by itself; events not acknowledged before a connection was lost
/// are delivered again.
///
/// ```no_run
/// use verimail_producer::{Config, Event, Subscriber};
///
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// let config = Config::from_env()?;
/// let mut subscriber =
///     Subscriber::bind(&config, "accounts", &["verimail.email.verified"]).await?;
/// while let Some(received) = subscriber.next().await {
///     let received = match received {
///         Ok(r) => r,
///         Err(e) => { eprintln!("skipped: {e}"); continue; }
///     };
///     if let Event::Verified(event) = &received.event {
///         println!("{} verified {}", event.data.user_id.as_deref().unwrap_or("?"), event.data.email);
///     }
///     received.ack().await?;
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Subscriber {
    bus: Arc<Bus>,
    topology: Topology,
    queue: String,
    patterns: Vec<String>,
    prefetch: u16,
    consuming: Option<(Channel, Consumer)>,
    shutdown: CancellationToken,
    /// Consecutive failed attempts to (re)start consuming, for backoff.
    failures: u32,
}

/// One event taken from the subscriber's queue; call [`Received::ack`] once
/// it is handled (or [`Received::retry_later`] to have it delivered again).
#[derive(Debug)]
pub struct Received {
    /// The decoded event.
    pub event: Event,
    /// The raw CloudEvent body.
    pub body: Vec<u8>,
    /// Whether the broker delivered it before (to this or another consumer).
    pub redelivered: bool,
    delivery: Delivery,
}

impl Received {
    /// The CloudEvent `id` (deduplicate on it).
    pub fn id(&self) -> &str {
        match &self.event {
            Event::Outcome(verimail_shared::events::Outcome::Sent(e)) => &e.id,
            Event::Outcome(verimail_shared::events::Outcome::Throttled(e)) => &e.id,
            Event::Outcome(verimail_shared::events::Outcome::Failed(e)) => &e.id,
            Event::Verified(e) => &e.id,
            Event::Requested(e) => &e.id,
            Event::Bounced(e) => &e.id,
            Event::Complained(e) => &e.id,
        }
    }

    /// Acknowledges the event: the broker forgets it.
    pub async fn ack(self) -> Result<(), SubscribeError> {
        self.delivery.ack(BasicAckOptions::default()).await?;
        Ok(())
    }

    /// Hands the event back to the queue, to be delivered again.
    pub async fn retry_later(self) -> Result<(), SubscribeError> {
        self.delivery
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await?;
        Ok(())
    }
}

impl Subscriber {
    /// Declares the queue `{ns}.sub.{name}` (durable, quorum), binds it to the
    /// namespace's exchange with each of `patterns`, and starts consuming.
    /// Waits (retrying) until the broker answers.
    pub async fn bind(
        config: &Config,
        name: &str,
        patterns: &[&str],
    ) -> Result<Self, SubscribeError> {
        Self::bind_until(config, name, patterns, &CancellationToken::new()).await
    }

    /// Like [`Subscriber::bind`]; [`Subscriber::next`] returns `None` once
    /// `shutdown` is cancelled.
    pub async fn bind_until(
        config: &Config,
        name: &str,
        patterns: &[&str],
        shutdown: &CancellationToken,
    ) -> Result<Self, SubscribeError> {
        let valid = !name.is_empty()
            && name.len() <= 100
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if !valid {
            return Err(SubscribeError::InvalidName(name.to_owned()));
        }
        let topology = Topology::new(config.namespace.clone());
        let bus =
            Bus::connect(&config.amqp_urls, &format!("verimail-sub-{name}"), shutdown).await?;
        let mut subscriber = Self {
            queue: topology.subscriber_queue(name),
            topology,
            bus,
            patterns: patterns.iter().map(|p| (*p).to_owned()).collect(),
            prefetch: DEFAULT_PREFETCH,
            consuming: None,
            // A child, so `close` stops this subscriber only.
            shutdown: shutdown.child_token(),
            failures: 0,
        };
        subscriber.start().await?;
        Ok(subscriber)
    }

    /// The queue's name (`{ns}.sub.{name}`).
    pub fn queue(&self) -> &str {
        &self.queue
    }

    async fn start(&mut self) -> Result<(), SubscribeError> {
        let channel = self.bus.channel().await?;
        // The exchange (and the rest of the topology) may not exist yet when
        // the subscriber starts before any other component.
        bus::declare(&channel, &self.topology).await?;
        let patterns: Vec<&str> = self.patterns.iter().map(String::as_str).collect();
        let name = self
            .queue
            .strip_prefix(&format!("{}.sub.", self.topology.exchange()))
            .unwrap_or(&self.queue)
            .to_owned();
        bus::declare_subscriber(&channel, &self.topology, &name, &patterns).await?;
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                self.queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        self.consuming = Some((channel, consumer));
        Ok(())
    }

    /// The next event, or `None` once the shutdown token is cancelled (or
    /// [`Subscriber::close`] was called).
    ///
    /// `Some(Err(_))` reports a message that is not a verimail event (it was
    /// dropped) or a failed reconnection attempt (the next call tries again);
    /// keep calling.
    pub async fn next(&mut self) -> Option<Result<Received, SubscribeError>> {
        let shutdown = self.shutdown.clone();
        loop {
            if shutdown.is_cancelled() {
                return None;
            }
            if self.consuming.is_none() {
                if self.failures > 0 {
                    let wait = Duration::from_millis(200 * 2u64.pow(self.failures.min(5)));
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = shutdown.cancelled() => return None,
                    }
                }
                // Bounded, as every wait on the broker (docs/operations.md).
                let bus = self.bus.clone();
                let start = bus.within("starting the subscriber", bus::SETUP_TIMEOUT, self.start());
                let started = tokio::select! {
                    r = start => r,
                    () = shutdown.cancelled() => return None,
                };
                match started {
                    Ok(()) => self.failures = 0,
                    Err(SubscribeError::Bus(BusError::Cancelled)) => return None,
                    Err(e) => {
                        self.failures = self.failures.saturating_add(1);
                        self.bus.forget().await;
                        return Some(Err(e));
                    }
                }
            }
            let Some((_, consumer)) = self.consuming.as_mut() else {
                continue;
            };
            let item = tokio::select! {
                item = consumer.next() => item,
                () = shutdown.cancelled() => return None,
            };
            match item {
                Some(Ok(delivery)) => return Some(self.decode(delivery).await),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, queue = %self.queue, "consumer failed, reconnecting");
                    self.consuming = None;
                    self.failures = self.failures.saturating_add(1);
                }
                None => {
                    tracing::warn!(queue = %self.queue, "consumer cancelled, resubscribing");
                    self.consuming = None;
                    self.failures = self.failures.saturating_add(1);
                }
            }
        }
    }

    async fn decode(&mut self, mut delivery: Delivery) -> Result<Received, SubscribeError> {
        match Event::decode(&delivery.data) {
            Ok(event) => Ok(Received {
                event,
                body: std::mem::take(&mut delivery.data),
                redelivered: delivery.redelivered,
                delivery,
            }),
            Err(source) => {
                let message_id = delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.to_string());
                tracing::warn!(?message_id, error = %source, "dropping a message that is not a verimail event");
                delivery
                    .reject(BasicRejectOptions { requeue: false })
                    .await?;
                Err(SubscribeError::Undecodable { message_id, source })
            }
        }
    }

    /// Stops consuming (unacknowledged events go back to the queue) and
    /// closes the connection. The queue and its bindings stay.
    pub async fn close(mut self) {
        self.shutdown.cancel();
        if let Some((channel, _)) = self.consuming.take() {
            let _ = channel.close(200, "closing".into()).await;
        }
        self.bus.close().await;
    }
}
