//! The topology and the confirmed publisher against the real RabbitMQ.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;
use verimail_shared::bus::{self, Bus, BusError, Outgoing, Publisher, Topology};
use verimail_shared::events::VERIFICATION_REQUESTED;

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn namespace() -> String {
    format!("t-bus-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

async fn cleanup(ch: &lapin::Channel, t: &Topology, extra: &[String]) {
    let mut queues = vec![t.worker_queue(), t.dead_queue()];
    queues.extend(bus::RETRY_DELAYS.iter().map(|d| t.retry_queue(*d)));
    queues.extend(extra.iter().cloned());
    for q in queues {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = ch
        .exchange_delete(t.exchange().into(), Default::default())
        .await;
}

#[tokio::test]
async fn declaring_twice_is_harmless_and_requests_reach_the_worker_queue() {
    let shutdown = CancellationToken::new();
    let bus = Bus::connect(&[URL.to_owned()], "bus-test", &shutdown)
        .await
        .expect("broker");
    let ch = bus.channel().await.expect("channel");
    let t = Topology::new(namespace());
    bus::declare(&ch, &t).await.expect("first declare");
    bus::declare(&ch, &t)
        .await
        .expect("second declare, same arguments");
    let sub = bus::declare_subscriber(&ch, &t, "accounts", &["verimail.email.*"])
        .await
        .expect("subscriber queue");

    let publisher = Publisher::new(bus.clone());
    let body = br#"{"hello":"worker"}"#;
    publisher
        .publish(&Outgoing::event(&t, VERIFICATION_REQUESTED, "m-1", body))
        .await
        .expect("a request is routed and confirmed");

    // Nothing is bound for this type: mandatory publishing reports it.
    let lost = publisher
        .publish(&Outgoing::event(&t, "verimail.nobody.listens", "m-2", body))
        .await;
    assert!(matches!(lost, Err(BusError::Unroutable(_))), "{lost:?}");

    let mut consumer = ch
        .basic_consume(
            t.worker_queue().as_str().into(),
            "bus-test".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("a delivery in time")
        .expect("stream open")
        .expect("delivery");
    assert_eq!(delivery.data, body);
    assert_eq!(
        delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some("m-1")
    );
    assert_eq!(delivery.properties.delivery_mode(), &Some(2));
    delivery.ack(BasicAckOptions::default()).await.expect("ack");
    cleanup(&ch, &t, &[sub]).await;
    bus.close().await;
}

#[tokio::test]
async fn a_message_in_the_first_retry_queue_comes_back_to_the_worker_queue() {
    let shutdown = CancellationToken::new();
    let bus = Bus::connect(&[URL.to_owned()], "bus-test", &shutdown)
        .await
        .expect("broker");
    let ch = bus.channel().await.expect("channel");
    let t = Topology::new(namespace());
    bus::declare(&ch, &t).await.expect("declare");
    let publisher = Publisher::new(bus.clone());
    let retry = t.retry_queue(bus::RETRY_DELAYS[0]);
    publisher
        .publish(&Outgoing {
            exchange: "",
            routing_key: &retry,
            message_id: "retry-1",
            kind: Some(VERIFICATION_REQUESTED),
            body: b"{}",
            headers: FieldTable::default(),
        })
        .await
        .expect("into the retry queue");
    let mut consumer = ch
        .basic_consume(
            t.worker_queue().as_str().into(),
            "bus-test".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
        .await
        .expect("back after the retry delay")
        .expect("stream open")
        .expect("delivery");
    assert_eq!(
        delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some("retry-1")
    );
    delivery.ack(BasicAckOptions::default()).await.expect("ack");
    cleanup(&ch, &t, &[]).await;
    bus.close().await;
}

#[tokio::test]
async fn connecting_to_a_closed_port_fails_fast_with_connect_once() {
    let started = std::time::Instant::now();
    let err = Bus::connect_once(&["amqp://guest:guest@127.0.0.1:1/%2f".to_owned()], "x").await;
    assert!(matches!(err, Err(BusError::Unreachable { .. })));
    assert!(started.elapsed() < Duration::from_secs(15));
}
