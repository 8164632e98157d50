//! The client library against the real RabbitMQ: publishing with confirms,
//! validation before publishing, and typed subscribing.

mod common;

use std::time::Duration;

use common::{Broker, namespace};
use serde_json::json;
use verimail_producer::{
    Event, Producer, ProducerError, Purpose, SubscribeError, Subscriber, VerificationRequest,
};
use verimail_shared::bus::{Bus, Outgoing, Publisher, Topology};

#[tokio::test]
async fn request_verification_publishes_a_confirmed_request_with_the_chosen_id() {
    let ns = namespace();
    let broker = Broker::new(&ns).await;
    let producer = Producer::connect(&common::config(&ns))
        .await
        .expect("connects")
        .with_source("/accounts");
    let request = VerificationRequest::new("42", "alice@example.com")
        .name("Alice")
        .purpose(Purpose::ResetPassword)
        .return_url("https://app.example.com/reset")
        .context(json!({"flow": "b"}))
        .with_id("req-lib-1");
    let id = producer
        .request_verification(request.clone())
        .await
        .expect("published");
    assert_eq!(id, "req-lib-1");
    // Publishing again (a retry) keeps the id: the worker serves it once.
    assert_eq!(
        producer.request_verification(request).await.expect("again"),
        "req-lib-1"
    );

    let worker = broker.topology.worker_queue();
    let delivery = broker
        .take(&worker)
        .await
        .expect("landed in the worker queue");
    assert_eq!(
        delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some("req-lib-1")
    );
    assert_eq!(
        delivery.properties.kind().as_ref().map(|s| s.as_str()),
        Some("verimail.verification.requested")
    );
    let body: serde_json::Value = serde_json::from_slice(&delivery.data).expect("JSON");
    assert_eq!(body["source"], "/accounts");
    assert_eq!(body["data"]["purpose"], "reset_password");
    assert_eq!(body["data"]["name"], "Alice");

    // Without an id, each request gets a fresh one.
    let a = producer
        .request_verification(VerificationRequest::new("1", "a@example.com"))
        .await
        .expect("published");
    let b = producer
        .request_verification(VerificationRequest::new("1", "a@example.com"))
        .await
        .expect("published");
    assert_ne!(a, b);
    producer.close().await;
    broker.cleanup(&[]).await;
}

#[tokio::test]
async fn request_verification_refuses_a_broken_field_and_publishes_nothing() {
    let ns = namespace();
    let broker = Broker::new(&ns).await;
    let producer = Producer::connect(&common::config_with(
        &ns,
        &[("RETURN_URL_ALLOWLIST", "https://app.example.com")],
    ))
    .await
    .expect("connects");
    let cases = [
        (VerificationRequest::new("42", "not-an-address"), "email"),
        (VerificationRequest::new("", "a@example.com"), "user_id"),
        (
            VerificationRequest::new("42", "a@example.com").locale("x y"),
            "locale",
        ),
        (
            VerificationRequest::new("42", "a@example.com").context(json!("s")),
            "context",
        ),
        (
            VerificationRequest::new("42", "a@example.com").return_url("https://evil.example.net/"),
            "return_url",
        ),
    ];
    for (request, field) in cases {
        let err = producer
            .request_verification(request)
            .await
            .expect_err("refused");
        assert!(matches!(err, ProducerError::Invalid(_)), "{err}");
        assert_eq!(err.invalid_field(), Some(field), "{err}");
    }
    assert_eq!(broker.count(&broker.topology.worker_queue()).await, 0);
    producer.close().await;
    broker.cleanup(&[]).await;
}

#[tokio::test]
async fn a_subscriber_receives_decoded_events_and_acknowledges_them() {
    let ns = namespace();
    let broker = Broker::new(&ns).await;
    let config = common::config(&ns);
    let mut subscriber = Subscriber::bind(&config, "accounts", &["verimail.email.verified"])
        .await
        .expect("bound");
    let queue = subscriber.queue().to_owned();
    assert_eq!(queue, format!("{ns}.sub.accounts"));

    let publisher = Publisher::new(
        Bus::connect_once(&config.amqp_urls, "test")
            .await
            .expect("bus"),
    );
    let topology = Topology::new(ns.clone());
    let verified = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/schemas/examples/verimail.email.verified.json"
    ))
    .expect("example");
    let junk = br#"{"type":"verimail.email.verified","id":"broken"}"#;
    for (id, body) in [("junk", &junk[..]), ("v-1", &verified[..])] {
        publisher
            .publish(&Outgoing::event(
                &topology,
                "verimail.email.verified",
                id,
                body,
            ))
            .await
            .expect("published");
    }

    let first = tokio::time::timeout(Duration::from_secs(10), subscriber.next())
        .await
        .expect("within 10 s")
        .expect("not closed");
    match first {
        Err(SubscribeError::Undecodable { message_id, .. }) => {
            assert_eq!(message_id.as_deref(), Some("junk"));
        }
        other => panic!("expected the undecodable message first, got {other:?}"),
    }
    let received = tokio::time::timeout(Duration::from_secs(10), subscriber.next())
        .await
        .expect("within 10 s")
        .expect("not closed")
        .expect("decoded");
    assert_eq!(received.id(), "01937c62-4d5e-7f60-8172-93a4b5c6d7e8");
    match &received.event {
        Event::Verified(event) => {
            assert_eq!(event.data.email, "alice@example.com");
            assert_eq!(event.data.user_id.as_deref(), Some("42"));
        }
        other => panic!("expected a verified event, got {other:?}"),
    }
    received.ack().await.expect("acknowledged");
    subscriber.close().await;
    // Acknowledged or dropped: nothing is left for the next start.
    assert_eq!(broker.count(&queue).await, 0);
    broker.cleanup(&[&queue]).await;
}

#[tokio::test]
async fn an_unacknowledged_event_is_delivered_again_after_a_restart() {
    let ns = namespace();
    let broker = Broker::new(&ns).await;
    let config = common::config(&ns);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut subscriber =
        Subscriber::bind_until(&config, "restart", &["verimail.verification.*"], &shutdown)
            .await
            .expect("bound");
    let producer = Producer::connect(&config).await.expect("producer");
    let id = producer
        .request_verification(VerificationRequest::new("9", "z@example.com"))
        .await
        .expect("published");
    let received = tokio::time::timeout(Duration::from_secs(10), subscriber.next())
        .await
        .expect("within 10 s")
        .expect("open")
        .expect("decoded");
    assert_eq!(received.id(), id);
    assert!(matches!(received.event, Event::Requested(_)));
    drop(received); // never acknowledged
    shutdown.cancel();
    assert!(
        subscriber.next().await.is_none(),
        "cancelled: the stream ends"
    );
    subscriber.close().await;

    let mut again = Subscriber::bind(&config, "restart", &["verimail.verification.*"])
        .await
        .expect("bound again");
    let redelivered = tokio::time::timeout(Duration::from_secs(10), again.next())
        .await
        .expect("within 10 s")
        .expect("open")
        .expect("decoded");
    assert_eq!(redelivered.id(), id);
    assert!(redelivered.redelivered);
    redelivered.ack().await.expect("acknowledged");
    let queue = again.queue().to_owned();
    again.close().await;
    producer.close().await;
    broker.cleanup(&[&queue]).await;
}

#[tokio::test]
async fn a_subscriber_name_that_would_make_a_bad_queue_name_is_refused() {
    let config = common::config(&namespace());
    for name in ["", "a b", "x/y"] {
        let err = Subscriber::bind(&config, name, &["verimail.#"]).await.err();
        assert!(
            matches!(err, Some(SubscribeError::InvalidName(_))),
            "{name:?}"
        );
    }
}

/// Closes, from the broker's side, the connections named `names`.
async fn close_connections_named(names: &[&str]) {
    let list = tokio::process::Command::new("rabbitmqctl")
        .args(["list_connections", "--silent", "pid", "client_properties"])
        .output()
        .await
        .expect("rabbitmqctl runs");
    let text = String::from_utf8_lossy(&list.stdout);
    for name in names {
        let line = text
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("a connection named {name} in {text}"));
        let pid = line.split_whitespace().next().expect("a pid");
        let closed = tokio::process::Command::new("rabbitmqctl")
            .args(["close_connection", pid, "test: connection lost"])
            .output()
            .await
            .expect("rabbitmqctl runs");
        assert!(closed.status.success());
    }
}

#[tokio::test]
async fn producer_and_subscriber_carry_on_after_the_broker_drops_their_connections() {
    let ns = namespace();
    let broker = Broker::new(&ns).await;
    let config = common::config(&ns);
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let sub_name = format!("rc{}", &tag[..12]);
    let mut subscriber = Subscriber::bind(&config, &sub_name, &["verimail.verification.requested"])
        .await
        .expect("bound");
    let producer = Producer::connect_as(&config, &format!("producer-{tag}"))
        .await
        .expect("producer");

    for round in 0..2 {
        let id = producer
            .request_verification(VerificationRequest::new("5", "r@example.com"))
            .await
            .unwrap_or_else(|e| {
                panic!("round {round}: published despite the lost connection: {e}")
            });
        let received = loop {
            let next = tokio::time::timeout(Duration::from_secs(20), subscriber.next())
                .await
                .expect("an event within 20 s")
                .expect("open");
            match next {
                Ok(received) => break received,
                // A reconnection attempt may fail once; the next call retries.
                Err(e) => eprintln!("round {round}: {e}"),
            }
        };
        assert_eq!(received.id(), id, "round {round}");
        received.ack().await.expect("acknowledged");
        if round == 0 {
            close_connections_named(&[
                &format!("producer-{tag}"),
                &format!("verimail-sub-{sub_name}"),
            ])
            .await;
        }
    }
    let queue = subscriber.queue().to_owned();
    subscriber.close().await;
    producer.close().await;
    broker.cleanup(&[&queue]).await;
}

#[tokio::test]
async fn a_request_whose_queues_were_deleted_declares_them_again_and_lands() {
    let ns = namespace();
    let broker = Broker::new(&ns).await;
    let producer = Producer::connect(&common::config(&ns))
        .await
        .expect("producer");
    let worker = broker.topology.worker_queue();
    broker
        .channel
        .queue_delete(
            worker.as_str().into(),
            lapin::options::QueueDeleteOptions::default(),
        )
        .await
        .expect("deleted");
    let id = producer
        .request_verification(VerificationRequest::new("3", "q@example.com"))
        .await
        .expect("published after declaring again");
    let delivery = broker.take(&worker).await.expect("landed");
    assert_eq!(
        delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some(id.as_str())
    );
    producer.close().await;
    broker.cleanup(&[]).await;
}
