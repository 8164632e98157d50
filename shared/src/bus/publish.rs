//! [`Publisher`]: persistent, mandatory, confirmed publishing of [`Outgoing`]
//! messages.

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::{Bus, BusError, OPEN_TIMEOUT, Topology};
use crate::events::CONTENT_TYPE;

/// How long a publish may wait for its confirm.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

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
        // Both steps bounded (`Bus::channel` bounds its own): every publish
        // waits behind this lock, so one unanswered opening would hold them all.
        let ch = self.bus.channel().await?;
        let confirms = async {
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            Ok::<_, BusError>(())
        };
        self.bus
            .within("turning on publisher confirms", OPEN_TIMEOUT, confirms)
            .await?;
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
        let confirmation = match tokio::time::timeout(CONFIRM_TIMEOUT, outcome).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                self.drop_channel(&channel).await;
                return Err(e.into());
            }
            Err(_) => {
                // No confirm within CONFIRM_TIMEOUT: treat the channel as broken.
                self.drop_channel(&channel).await;
                return Err(BusError::TimedOut {
                    what: "a publish confirm",
                    after: CONFIRM_TIMEOUT,
                });
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
