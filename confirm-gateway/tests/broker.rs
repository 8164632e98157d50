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
    // No poll within the test's time: an event can only leave because the
    // click woke the relay.
    let mut relay = app.state.relay();
    relay.poll = Duration::from_secs(3600);
    let relay = tokio::spawn(relay.run(stop.clone()));

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
    assert!(latency < Duration::from_secs(10), "{latency:?}");
    // The first event may have left with the relay's first pass at start; the
    // relay is idle now, and only a wake-up can send the second one.
    let answer = app
        .get(&format!("/confirm/{}", app.token("e2", "verify_email")))
        .await;
    assert_eq!(answer.status, 200);
    let second = sub
        .next(Duration::from_secs(10))
        .await
        .expect("the click woke the relay");
    assert_eq!(second.message_id, event_id_of(&app, "r:e2").await);
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

/// One request through the tests' HTTP client: (status, body).
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let url = format!("http://{addr}{path}");
    let (status, _, body) = verimail_tests::http::request(method, &url, headers)
        .await
        .expect("an HTTP answer");
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
        &[("accept", "application/json")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"verified\""));
    let (status, body) = http(ops, "GET", "/readyz", &[]).await;
    assert_eq!(status, 503);
    assert!(body.contains("\"broker\":\"unreachable\""), "{body}");
    let (status, _) = http(ops, "GET", "/healthz", &[]).await;
    assert_eq!(status, 200);
    let (status, body) = http(ops, "GET", "/metrics", &[]).await;
    assert_eq!(status, 200);
    assert!(
        body.contains("verimail_gateway_confirm_requests_total"),
        "{body}"
    );
    // The public listener serves /confirm only.
    for path in ["/readyz", "/healthz", "/metrics"] {
        assert_eq!(http(addr, "GET", path, &[]).await.0, 404, "{path}");
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
    let (status, _) = http(ops, "GET", "/readyz", &[]).await;
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

/// A row as the gateway writes it, but created `age` ago (its UUIDv7 id too).
async fn insert_aged_event(app: &TestApp, age: Duration) -> String {
    let at = time::OffsetDateTime::now_utc() - age;
    let ms = (at.unix_timestamp_nanos() / 1_000_000) as u128;
    let id = uuid::Uuid::from_u128((ms << 80) | (0x7 << 76) | u128::from(rand_low())).to_string();
    let body = serde_json::json!({"specversion": "1.0", "id": id, "type": EMAIL_VERIFIED});
    sqlx::query("INSERT INTO outbox (id, routing_key, body, created_at) VALUES ($1, $2, $3, $4)")
        .bind(&id)
        .bind(EMAIL_VERIFIED)
        .bind(body.to_string().into_bytes())
        .bind(at)
        .execute(app.pool())
        .await
        .expect("insert an aged event");
    id
}

fn rand_low() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().1
}

#[tokio::test]
async fn unpublished_events_older_than_the_retention_are_dropped_and_counted() {
    let (_, _, namespace) = config(&[]);
    let app = TestApp::new(&[
        ("VERIMAIL_NAMESPACE", &namespace),
        ("RETENTION_HOURS", "1"),
        ("TOKEN_TTL_SECONDS", "60"),
    ])
    .await;
    let mut old = HashSet::new();
    for _ in 0..3 {
        old.insert(insert_aged_event(&app, Duration::from_secs(2 * 3600)).await);
    }
    for i in 0..2 {
        let answer = app
            .get(&format!(
                "/confirm/{}",
                app.token(&format!("f{i}"), "verify_email")
            ))
            .await;
        assert_eq!(answer.status, 200);
    }
    let fresh: HashSet<String> = app
        .outbox()
        .await
        .into_iter()
        .map(|(id, _)| id)
        .filter(|id| !old.contains(id))
        .collect();
    assert_eq!(fresh.len(), 2);

    // The exchange exists, but nobody is subscribed: nothing can be published.
    let bus = Bus::connect_once(
        &[verimail_shared::config::defaults::AMQP_URL.to_owned()],
        "relay-expiry",
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
    let stop = CancellationToken::new();
    let running = tokio::spawn(relay.run(stop.clone()));

    let metrics = app.state.metrics().clone();
    assert!(
        eventually(Duration::from_secs(10), || {
            let text = metrics.render();
            async move { text.contains("verimail_gateway_outbox_expired_total 3") }
        })
        .await,
        "{}",
        app.state.metrics().render()
    );
    let left: HashSet<String> = app.outbox().await.into_iter().map(|(id, _)| id).collect();
    assert_eq!(left, fresh, "only the events within the retention are kept");

    // A subscriber binds: the kept events go out, the dropped ones never.
    let sub = Subscriber::new(&namespace).await;
    app.state.relay().wake.notify_one();
    let mut got = HashSet::new();
    while let Some(r) = sub.next(Duration::from_secs(15)).await {
        got.insert(r.message_id);
        if got.len() == fresh.len() {
            break;
        }
    }
    assert_eq!(got, fresh);

    stop.cancel();
    running.await.expect("the relay stops");
    let _ = channel.close(200, "done".into()).await;
    bus.close().await;
    sub.cleanup().await;
    app.cleanup().await;
}

#[tokio::test]
async fn the_backlog_is_read_without_counting_every_row() {
    use verimail_gateway::store::{BACKLOG_EXACT, outbox_backlog};
    let app = TestApp::new(&[]).await;
    for _ in 0..3 {
        insert_aged_event(&app, Duration::ZERO).await;
    }
    assert_eq!(
        outbox_backlog(app.pool()).await.expect("backlog"),
        3,
        "exact when small"
    );

    sqlx::query(
        "INSERT INTO outbox (id, routing_key, body) \
         SELECT 'bulk-' || lpad(g::text, 6, '0'), $1, '{}'::bytea FROM generate_series(1, 20000) g",
    )
    .bind(EMAIL_VERIFIED)
    .execute(app.pool())
    .await
    .expect("a large backlog");
    sqlx::query("ANALYZE outbox")
        .execute(app.pool())
        .await
        .expect("analyze");
    // Tuples read by the one statement, from this transaction's statistics.
    let mut tx = app.pool().begin().await.expect("begin");
    let backlog = outbox_backlog(&mut *tx).await.expect("backlog");
    let read: i64 = sqlx::query_scalar(
        "SELECT (pg_stat_get_xact_tuples_returned('outbox'::regclass) \
               + pg_stat_get_xact_tuples_fetched('outbox'::regclass) \
               + pg_stat_get_xact_tuples_returned('outbox_pkey'::regclass) \
               + pg_stat_get_xact_tuples_fetched('outbox_pkey'::regclass))::bigint",
    )
    .fetch_one(&mut *tx)
    .await
    .expect("statistics");
    tx.rollback().await.expect("rollback");
    assert!(
        read <= 2 * BACKLOG_EXACT,
        "read {read} tuples for a backlog of 20,003"
    );
    assert!(
        (18_000..=22_000).contains(&backlog),
        "estimate {backlog} for 20,003 rows"
    );
    app.cleanup().await;
}
