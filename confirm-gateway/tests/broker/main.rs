//! The outbox relay against the real RabbitMQ: events reach subscribers with
//! confirms, survive a broker outage with the same id, and two relays never
//! publish one row twice. Also the whole gateway over TCP (build, run, stop).
//!
//! Rooms: [`relay`] (what the relay publishes, once), [`outage`] (the whole
//! gateway started without a broker), [`backlog`] (retention of unpublished
//! events and the backlog gauge). Here: a subscriber of the verified events.

#[path = "../common/mod.rs"]
mod common;

mod backlog;
mod outage;
mod relay;

use std::sync::Arc;
use std::time::Duration;

use common::{EventTap, TestApp};
use lapin::message::Delivery;
use verimail_shared::bus::{Bus, Topology};
use verimail_shared::events::{EMAIL_VERIFIED, Event};

/// A subscriber queue bound to `{ns}` with `verimail.email.verified`: the
/// common event tap, each delivery decoded.
struct Subscriber(EventTap);

/// A verified event as a subscriber receives it.
#[derive(Debug)]
struct Received {
    message_id: String,
    routing_key: String,
    delivery_mode: Option<u8>,
    content_type: String,
    event: Event,
    event_id: String,
}

impl Subscriber {
    async fn new(namespace: &str) -> Self {
        Self(EventTap::bind(namespace, "test", EMAIL_VERIFIED).await)
    }

    /// The next message, waiting up to `timeout`.
    async fn next(&self, timeout: Duration) -> Option<Received> {
        self.0.next(timeout).await.map(received)
    }

    async fn cleanup(self) {
        self.0.cleanup().await;
    }
}

/// Decodes a delivery that must be a verified event.
fn received(d: Delivery) -> Received {
    let event = Event::decode(&d.data).expect("a verimail event");
    let Event::Verified(verified) = &event else {
        panic!("expected a verified event, got {event:?}");
    };
    Received {
        message_id: d
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default(),
        routing_key: d.routing_key.to_string(),
        delivery_mode: *d.properties.delivery_mode(),
        content_type: d
            .properties
            .content_type()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default(),
        event_id: verified.id.clone(),
        event,
    }
}

/// The event id recorded with the confirmation `key` (`r:{request_id}`).
async fn event_id_of(app: &TestApp, key: &str) -> String {
    sqlx::query_scalar("SELECT event_id FROM confirmations WHERE key = $1")
        .bind(key)
        .fetch_one(app.pool())
        .await
        .expect("a confirmation")
}

/// A connection of its own to the machine's broker, named `name`.
async fn connect(name: &str) -> Arc<Bus> {
    Bus::connect_once(
        &[verimail_shared::config::defaults::AMQP_URL.to_owned()],
        name,
    )
    .await
    .expect("RabbitMQ")
}

/// [`connect`], with `namespace`'s exchange declared and no queue bound to
/// it: whatever is published there is unroutable.
async fn exchange_only(namespace: &str, name: &str) -> Arc<Bus> {
    let bus = connect(name).await;
    let channel = bus.channel().await.expect("a channel");
    verimail_shared::bus::declare_exchange(&channel, &Topology::new(namespace.to_owned()))
        .await
        .expect("declare the exchange");
    let _ = channel.close(200, "declared".into()).await;
    bus
}
