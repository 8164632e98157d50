//! An event tap: a queue of the test's own bound to a namespace's exchange,
//! read with `basic.get`, which is how a gateway test sees what the gateway
//! published. One helper, so no test hand-rolls its own AMQP consumer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{
    BasicGetOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use verimail_shared::bus::{Bus, RETRY_DELAYS, Topology};

/// A subscriber queue `{ns}.sub.{name}` bound with one binding key, and the
/// broker connection it was declared on.
pub struct EventTap {
    bus: Arc<Bus>,
    channel: Channel,
    topology: Topology,
    queue: String,
}

impl EventTap {
    /// Connects to the local broker, declares `namespace`'s exchange (as the
    /// gateway would) and a queue `{ns}.sub.{name}` bound with `binding`
    /// (`verimail.email.verified`, `verimail.email.#`), so events published
    /// from now on are kept for the test.
    pub async fn bind(namespace: &str, name: &str, binding: &str) -> Self {
        let bus = Bus::connect_once(
            &[verimail_shared::config::defaults::AMQP_URL.to_owned()],
            &format!("gateway-test-tap {name}"),
        )
        .await
        .expect("RabbitMQ runs locally");
        let channel = bus.channel().await.expect("a channel");
        let topology = Topology::new(namespace);
        verimail_shared::bus::declare_exchange(&channel, &topology)
            .await
            .expect("declare the exchange");
        let queue = topology.subscriber_queue(name);
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("declare the tap's queue");
        channel
            .queue_bind(
                queue.as_str().into(),
                topology.exchange().into(),
                binding.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind the tap's queue");
        Self {
            bus,
            channel,
            topology,
            queue,
        }
    }

    /// The tap's broker connection, for a gateway state that should publish
    /// on the same broker.
    pub fn bus(&self) -> Arc<Bus> {
        self.bus.clone()
    }

    /// The next event on the tap (acknowledged as it is taken), waiting up
    /// to `timeout`; `None` when none came.
    pub async fn next(&self, timeout: Duration) -> Option<Delivery> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self
                .channel
                .basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .expect("basic.get");
            if let Some(message) = got {
                return Some(message.delivery);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Deletes the tap's queue, the queues a gateway or worker may have
    /// declared in the namespace, and its exchange; closes the connection.
    pub async fn cleanup(self) {
        let mut queues = vec![
            self.queue.clone(),
            self.topology.worker_queue(),
            self.topology.dead_queue(),
        ];
        queues.extend(RETRY_DELAYS.iter().map(|d| self.topology.retry_queue(*d)));
        for q in queues {
            let _ = self
                .channel
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = self
            .channel
            .exchange_delete(
                self.topology.exchange().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
        self.bus.close().await;
    }
}
