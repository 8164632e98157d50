//! The outbox relay against the real RabbitMQ: events reach subscribers with
//! confirms, survive a broker outage with the same id, and two relays never
//! publish one row twice. Also the whole gateway over TCP (build, run, stop).

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use lapin::Channel;
use lapin::options::{
    BasicGetOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use verimail_gateway::{BusSlot, Gateway};
use verimail_shared::bus::{Bus, RETRY_DELAYS, Topology};
use verimail_shared::events::{EMAIL_VERIFIED, Event};

/// A subscriber queue bound to `{ns}` with `verimail.email.verified`.
struct Subscriber {
    bus: Arc<Bus>,
    channel: Channel,
    topology: Topology,
    queue: String,
}

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
        let bus = Bus::connect_once(
            &[verimail_shared::config::defaults::AMQP_URL.to_owned()],
            "gateway-test",
        )
        .await
        .expect("RabbitMQ runs locally");
        let channel = bus.channel().await.expect("a channel");
        let topology = Topology::new(namespace);
        verimail_shared::bus::declare_exchange(&channel, &topology)
            .await
            .expect("declare the exchange");
        let queue = topology.subscriber_queue("test");
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("declare the subscriber queue");
        channel
            .queue_bind(
                queue.as_str().into(),
                topology.exchange().into(),
                EMAIL_VERIFIED.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
        Self {
            bus,
            channel,
            topology,
            queue,
        }
    }

    /// The next message, waiting up to `timeout`.
    async fn next(&self, timeout: Duration) -> Option<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self
                .channel
                .basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .expect("basic.get");
            if let Some(message) = got {
                let d = message.delivery;
                let event = Event::decode(&d.data).expect("a verimail event");
                let Event::Verified(verified) = &event else {
                    panic!("expected a verified event, got {event:?}");
                };
                return Some(Received {
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
                });
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn cleanup(self) {
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

async fn event_id_of(app: &TestApp, key: &str) -> String {
    sqlx::query_scalar("SELECT event_id FROM confirmations WHERE key = $1")
        .bind(key)
        .fetch_one(app.pool())
        .await
        .expect("a confirmation")
}

#[tokio::test]
async fn the_verified_event_reaches_a_queue_bound_to_the_exchange() {
    let (_, _, namespace) = config(&[]);
    let sub = Subscriber::new(&namespace).await;
    let bus = Bus::connect_once(
        &[verimail_shared::config::defaults::AMQP_URL.to_owned()],
        "gateway-relay",
    )
    .await
    .expect("RabbitMQ");
    let app = TestApp::with_bus(
        &[("VERIMAIL_NAMESPACE", &namespace)],
        BusSlot::with(bus.clone()),
    )
    .await;
    let stop = CancellationToken::new();
    let relay = tokio::spawn(app.state.relay().run(stop.clone()));

    app.insert_request(
        "e1",
        "e1@example.com",
        "verify_email",
        None,
        Some(serde_json::json!({"k": "v"})),
        Duration::ZERO,
    )
    .await;
    let clicked = Instant::now();
    let answer = app
        .get(&format!("/confirm/{}", app.token("e1", "verify_email")))
        .await;
    assert_eq!(answer.status, 200);
    let got = sub
        .next(Duration::from_secs(10))
        .await
        .expect("the event arrives");
    let latency = clicked.elapsed();
    let id = event_id_of(&app, "r:e1").await;
    assert_eq!(got.message_id, id);
    assert_eq!(got.event_id, id);
    assert_eq!(got.routing_key, EMAIL_VERIFIED);
    assert_eq!(got.delivery_mode, Some(2));
    assert_eq!(got.content_type, "application/cloudevents+json");
    let Event::Verified(ev) = got.event else {
        unreachable!()
    };
    assert_eq!(ev.data.request_id.as_deref(), Some("e1"));
    assert_eq!(
        ev.data.context,
        Some(serde_json::from_value(serde_json::json!({"k": "v"})).expect("map"))
    );
    // Woken by the click, not by the 1 s poll.
    assert!(latency < Duration::from_millis(900), "{latency:?}");
    assert!(
        eventually(Duration::from_secs(5), || async {
            app.outbox().await.is_empty()
        })
        .await
    );

    stop.cancel();
    relay.await.expect("the relay stops");
    bus.close().await;
    sub.cleanup().await;
    app.cleanup().await;
}

/// One HTTP/1.1 request over a fresh connection: (status, body).
async fn http(addr: SocketAddr, method: &str, path: &str, headers: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 0\r\n{headers}\r\n"
    );
    stream.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn the_outbox_survives_a_broker_outage_and_sends_the_same_id() {
    // The gateway starts with the broker unreachable (a closed port).
    let (config, db_name, namespace) =
        config(&[("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")]);
    let gateway = Gateway::build(config)
        .await
        .expect("the gateway starts without a broker");
    let addr = gateway.local_addr();
    let ops = gateway.metrics_addr();
    assert_ne!(addr.port(), 0);
    assert_ne!(ops.port(), 0);
    assert_ne!(ops, addr);
    let state = gateway.state().clone();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(gateway.run(shutdown.clone()));

    let now = time::OffsetDateTime::now_utc();
    let token = state.signer().mint_v1(&claims(
        "o1",
        "verify_email",
        None,
        now,
        now + time::Duration::hours(1),
    ));
    let (status, body) = http(
        addr,
        "GET",
        &format!("/confirm/{token}"),
        "Accept: application/json\r\n",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"verified\""));
    let (status, body) = http(ops, "GET", "/readyz", "").await;
    assert_eq!(status, 503);
    assert!(body.contains("\"broker\":\"unreachable\""), "{body}");
    let (status, _) = http(ops, "GET", "/healthz", "").await;
    assert_eq!(status, 200);
    let (status, body) = http(ops, "GET", "/metrics", "").await;
    assert_eq!(status, 200);
    assert!(
        body.contains("verimail_gateway_confirm_requests_total"),
        "{body}"
    );
    // The public listener serves /confirm only.
    for path in ["/readyz", "/healthz", "/metrics"] {
        assert_eq!(http(addr, "GET", path, "").await.0, 404, "{path}");
    }
    let pending: Vec<String> = sqlx::query_scalar("SELECT id FROM outbox")
        .fetch_all(state.pool())
        .await
        .expect("outbox");
    assert_eq!(pending.len(), 1);

    // The broker is back: the relay sends the very same event id.
    let sub = Subscriber::new(&namespace).await;
    let bus = Bus::connect_once(
        &[verimail_shared::config::defaults::AMQP_URL.to_owned()],
        "gateway-back",
    )
    .await
    .expect("RabbitMQ");
    state.bus().set(bus);
    let got = sub
        .next(Duration::from_secs(10))
        .await
        .expect("the event goes out");
    assert_eq!(got.message_id, pending[0]);
    assert_eq!(got.event_id, pending[0]);
    let (status, _) = http(ops, "GET", "/readyz", "").await;
    assert_eq!(status, 200);
    let pool = state.pool().clone();
    assert!(
        eventually(Duration::from_secs(5), || {
            let pool = pool.clone();
            async move {
                sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox")
                    .fetch_one(&pool)
                    .await
                    .is_ok_and(|n| n == 0)
            }
        })
        .await
    );

    // A clean stop: run returns Ok, promptly.
    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("stops within 10 s")
        .expect("the task did not panic");
    assert!(stopped.is_ok(), "{stopped:?}");
    for a in [addr, ops] {
        assert!(
            tokio::net::TcpStream::connect(a).await.is_err(),
            "{a} no longer listening"
        );
    }
    sub.cleanup().await;
    drop(state);
    drop_database(&db_name).await;
}

#[tokio::test]
async fn two_relays_never_publish_one_row_twice() {
    let (_, _, namespace) = config(&[]);
    let sub = Subscriber::new(&namespace).await;
    // Clicks while no relay runs: the rows pile up.
    let app = TestApp::new(&[("VERIMAIL_NAMESPACE", &namespace)]).await;
    const N: usize = 250;
    for i in 0..N {
        let answer = app
            .get(&format!(
                "/confirm/{}",
                app.token(&format!("c{i}"), "verify_email")
            ))
            .await;
        assert_eq!(answer.status, 200);
    }
    assert_eq!(app.outbox().await.len(), N);

    let stop = CancellationToken::new();
    let mut relays = Vec::new();
    for name in ["relay-a", "relay-b"] {
        let bus = Bus::connect_once(
            &[verimail_shared::config::defaults::AMQP_URL.to_owned()],
            name,
        )
        .await
        .expect("RabbitMQ");
        let mut relay = app.state.relay();
        relay.bus = BusSlot::with(bus);
        relays.push(tokio::spawn(relay.run(stop.clone())));
    }
    let mut seen = HashSet::new();
    let mut total = 0;
    while let Some(got) = sub.next(Duration::from_secs(3)).await {
        total += 1;
        seen.insert(got.message_id);
    }
    assert_eq!(seen.len(), N);
    assert_eq!(total, N, "no event was published twice");
    assert!(app.outbox().await.is_empty());
    stop.cancel();
    for r in relays {
        r.await.expect("relay stops");
    }
    sub.cleanup().await;
    app.cleanup().await;
}

#[tokio::test]
async fn events_nobody_is_subscribed_to_stay_in_the_outbox_until_a_queue_is_bound() {
    let (_, _, namespace) = config(&[]);
    let app = TestApp::new(&[("VERIMAIL_NAMESPACE", &namespace)]).await;
    const N: usize = 3;
    for i in 0..N {
        let answer = app
            .get(&format!(
                "/confirm/{}",
                app.token(&format!("u{i}"), "verify_email")
            ))
            .await;
        assert_eq!(answer.status, 200);
    }
    let before = app.outbox().await;
    assert_eq!(before.len(), N);

    // The exchange exists, but no queue is bound to it yet.
    let bus = Bus::connect_once(
        &[verimail_shared::config::defaults::AMQP_URL.to_owned()],
        "relay-unroutable",
    )
    .await
    .expect("RabbitMQ");
    let topology = Topology::new(namespace.clone());
    let channel = bus.channel().await.expect("a channel");
    verimail_shared::bus::declare_exchange(&channel, &topology)
        .await
        .expect("declare the exchange");
    let mut relay = app.state.relay();
    relay.bus = BusSlot::with(bus.clone());
    let publisher = verimail_shared::bus::Publisher::new(bus.clone());

    let first = relay.batch(&publisher).await.expect("a batch");
    assert_eq!(first.published, 0, "{first:?}");
    assert_eq!(first.unroutable, N, "{first:?}");
    // Put back as they were: same ids, same bodies.
    assert_eq!(app.outbox().await, before);

    // A subscriber binds: the very same events go out, once, and leave the outbox.
    let sub = Subscriber::new(&namespace).await;
    let second = relay.batch(&publisher).await.expect("a batch");
    assert_eq!(second.published, N, "{second:?}");
    assert_eq!(second.failed, 0, "{second:?}");
    let mut got = HashSet::new();
    while let Some(r) = sub.next(Duration::from_secs(2)).await {
        assert!(got.insert(r.message_id), "published twice");
    }
    let want: HashSet<String> = before.into_iter().map(|(id, _)| id).collect();
    assert_eq!(got, want);
    assert!(app.outbox().await.is_empty());
    let third = relay.batch(&publisher).await.expect("a batch");
    assert_eq!(third.published, 0, "{third:?}");

    let _ = channel.close(200, "done".into()).await;
    sub.cleanup().await;
    app.cleanup().await;
}
