//! Helpers for the producer's tests: a fresh namespace per test, direct
//! broker access to check what landed where, and clean-up.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use verimail_shared::Config;
use verimail_shared::bus::{RETRY_DELAYS, Topology};

/// The broker every test uses (the contract's default).
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A namespace of its own for one test.
pub fn namespace() -> String {
    format!("t-{}", uuid::Uuid::new_v4().simple())
}

/// The configuration of `ns`, everything else at its default.
pub fn config(ns: &str) -> Config {
    config_with(ns, &[])
}

/// The configuration of `ns` with extra variables.
pub fn config_with(ns: &str, vars: &[(&str, &str)]) -> Config {
    let ns = ns.to_owned();
    let vars: Vec<(String, String)> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Config::from_lookup(move |name| {
        if name == "VERIMAIL_NAMESPACE" {
            return Some(ns.clone());
        }
        vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    })
    .expect("a valid test configuration")
}

/// A direct connection to the broker, for setting up and checking.
pub struct Broker {
    pub connection: Connection,
    pub channel: Channel,
    pub topology: Topology,
}

impl Broker {
    /// Connects and declares `ns`'s topology.
    pub async fn new(ns: &str) -> Self {
        let connection = Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .expect("RabbitMQ runs on 127.0.0.1:5672");
        let channel = connection.create_channel().await.expect("a channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        let topology = Topology::new(ns);
        verimail_shared::bus::declare(&channel, &topology)
            .await
            .expect("declare the topology");
        Self {
            connection,
            channel,
            topology,
        }
    }

    /// Declares a durable queue bound to the namespace's exchange with `pattern`.
    pub async fn bind(&self, queue: &str, pattern: &str) {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare a test queue");
        self.channel
            .queue_bind(
                queue.into(),
                self.topology.exchange().into(),
                pattern.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind a test queue");
    }

    /// Puts a letter straight into `{ns}.dead`, as the worker or the broker would.
    pub async fn put_dead(
        &self,
        body: &[u8],
        message_id: Option<&str>,
        kind: Option<&str>,
        headers: FieldTable,
    ) {
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/cloudevents+json".into())
            .with_headers(headers);
        if let Some(id) = message_id {
            props = props.with_message_id(id.into());
        }
        if let Some(kind) = kind {
            props = props.with_type(kind.into());
        }
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                self.topology.dead_queue().as_str().into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .expect("publish a letter")
            .await
            .expect("a confirm");
        assert!(confirm.is_ack(), "the broker took the letter");
    }

    /// Takes the next message of `queue` (acknowledged), waiting up to 10 s.
    pub async fn take(&self, queue: &str) -> Option<lapin::message::Delivery> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = self
                .channel
                .basic_get(queue.into(), BasicGetOptions { no_ack: true })
                .await
                .expect("basic.get");
            if let Some(message) = got {
                return Some(message.delivery);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// How many messages `queue` holds (ready), once the figure holds still:
    /// a CLI process that just exited may still be handing its unacknowledged
    /// messages back while the broker notices its closed connection.
    pub async fn count(&self, queue: &str) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut last = self.count_now(queue).await;
        let mut steady = 0;
        while steady < 4 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = self.count_now(queue).await;
            steady = if now == last { steady + 1 } else { 0 };
            last = now;
        }
        last
    }

    async fn count_now(&self, queue: &str) -> u32 {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("the queue exists")
            .message_count()
    }

    /// Deletes the namespace's queues (and `extra` ones) and its exchange.
    pub async fn cleanup(self, extra: &[&str]) {
        let t = &self.topology;
        let mut queues = vec![t.worker_queue(), t.dead_queue()];
        queues.extend(RETRY_DELAYS.iter().map(|d| t.retry_queue(*d)));
        queues.extend(extra.iter().map(|q| (*q).to_owned()));
        for queue in queues {
            let _ = self
                .channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = self
            .channel
            .exchange_delete(t.exchange().into(), ExchangeDeleteOptions::default())
            .await;
        let _ = self.connection.close(200, "done".into()).await;
    }
}

/// A string header of a delivery.
pub fn header(delivery: &lapin::message::Delivery, name: &str) -> Option<AMQPValue> {
    delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(name).cloned())
}

/// A valid request body with `id`.
pub fn request_body(id: &str, email: &str) -> Vec<u8> {
    serde_json::json!({
        "specversion": "1.0", "id": id, "source": "/tests",
        "type": "verimail.verification.requested",
        "time": "2026-11-24T10:00:00Z", "datacontenttype": "application/json",
        "data": {"user_id": "42", "email": email}
    })
    .to_string()
    .into_bytes()
}
