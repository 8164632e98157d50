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

/// A TCP proxy in front of the machine's broker whose broker-to-client
/// direction can be muted: what the broker says is read and dropped, so a
/// request the client makes is never answered, on a connection that stays
/// open. Counts the client connections it accepted.
struct MutingProxy {
    url: String,
    mute: std::sync::Arc<std::sync::atomic::AtomicBool>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl MutingProxy {
    async fn start() -> Self {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port");
        let url = format!(
            "amqp://guest:guest@{}/%2f",
            listener.local_addr().expect("bound")
        );
        let mute = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (m, a) = (mute.clone(), accepted.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let Ok(broker) = tokio::net::TcpStream::connect("127.0.0.1:5672").await else {
                    continue;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut broker_read, mut broker_write) = broker.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut broker_write).await;
                });
                let mute = m.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0; 16 * 1024];
                    while let Ok(n) = broker_read.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        if !mute.load(Ordering::SeqCst)
                            && client_write.write_all(&buf[..n]).await.is_err()
                        {
                            break;
                        }
                    }
                });
            }
        });
        Self {
            url,
            mute,
            accepted,
        }
    }

    fn set_muted(&self, muted: bool) {
        self.mute.store(muted, std::sync::atomic::Ordering::SeqCst);
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Awaits `call` against a silenced broker: it must give up on its own with
/// `TimedOut` after [`bus::OPEN_TIMEOUT`] (not hang: 25 s guard). Answers
/// what it said it waited for.
async fn given_up_at_open_timeout<T: std::fmt::Debug>(
    call: impl std::future::Future<Output = Result<T, BusError>>,
) -> &'static str {
    let started = std::time::Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(25), call)
        .await
        .expect("gave up instead of hanging");
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "{:?}",
        started.elapsed()
    );
    match result {
        Err(BusError::TimedOut { what, after }) if after == bus::OPEN_TIMEOUT => what,
        other => panic!("expected a timeout, got {other:?}"),
    }
}

/// Unmutes the proxy and opens a channel, which must come on a fresh
/// connection: the proxy's `connections`-th.
async fn reopened(bus: &Bus, proxy: &MutingProxy, connections: usize) -> lapin::Channel {
    proxy.set_muted(false);
    let ch = tokio::time::timeout(Duration::from_secs(20), bus.channel())
        .await
        .expect("no hang")
        .expect("a channel on a fresh connection");
    assert_eq!(proxy.accepted(), connections);
    ch
}

#[tokio::test]
async fn a_confirm_channel_the_broker_never_opens_is_given_up_and_the_next_publish_reconnects() {
    let proxy = MutingProxy::start().await;
    let shutdown = CancellationToken::new();
    let bus = Bus::connect(std::slice::from_ref(&proxy.url), "bus-test-mute", &shutdown)
        .await
        .expect("broker through the proxy");
    // The queue, on a direct connection the proxy does not touch.
    let direct = Bus::connect(&[URL.to_owned()], "bus-test-direct", &shutdown)
        .await
        .expect("broker");
    let ch = direct.channel().await.expect("channel");
    let queue = declared_queue(&ch, "muted").await;
    let publisher = Publisher::new(bus.clone());
    let msg = Outgoing {
        exchange: "",
        routing_key: &queue,
        message_id: "m-1",
        kind: None,
        body: b"{}",
        headers: FieldTable::default(),
    };

    // The connection is up, but the broker's answer to the channel's opening
    // never arrives: the publish must fail, not wait for ever (it did, in the
    // cluster test, holding every other publish behind it).
    proxy.set_muted(true);
    assert_eq!(
        given_up_at_open_timeout(publisher.publish(&msg)).await,
        "opening a channel"
    );

    // The next publish does not reuse the silent connection: it opens a new
    // one, and the broker takes the message.
    proxy.set_muted(false);
    tokio::time::timeout(Duration::from_secs(20), publisher.publish(&msg))
        .await
        .expect("no hang")
        .expect("published on a fresh connection");
    assert_eq!(proxy.accepted(), 2);
    let got = ch
        .basic_get(queue.as_str().into(), Default::default())
        .await
        .expect("basic.get");
    assert!(got.is_some(), "the message reached the queue");

    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    publisher.close().await;
    bus.close().await;
    direct.close().await;
}

#[tokio::test]
async fn a_channel_or_consumer_the_broker_never_opens_is_given_up_and_the_next_one_reconnects() {
    let proxy = MutingProxy::start().await;
    let shutdown = CancellationToken::new();
    let bus = Bus::connect(
        std::slice::from_ref(&proxy.url),
        "bus-test-mute-channel",
        &shutdown,
    )
    .await
    .expect("broker through the proxy");

    // A plain channel (the worker's consumer, the gateway's relay, the CLI
    // open theirs this way): bounded, then the connection is forgotten.
    proxy.set_muted(true);
    assert_eq!(
        given_up_at_open_timeout(bus.channel()).await,
        "opening a channel"
    );

    // The next channel is opened on a new connection.
    let ch = reopened(&bus, &proxy, 2).await;

    // A consumer's start on an open channel that then goes silent (what
    // `within` bounds in the worker): given up, the connection forgotten.
    let queue = declared_queue(&ch, "muted-consumer").await;
    proxy.set_muted(true);
    let start = async {
        let consumer = ch
            .basic_consume(
                queue.as_str().into(),
                "muted".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok::<_, BusError>(consumer)
    };
    let consuming = bus
        .within("starting the consumer", Duration::from_secs(2), start)
        .await;
    assert!(
        matches!(
            consuming,
            Err(BusError::TimedOut {
                what: "starting the consumer",
                ..
            })
        ),
        "{consuming:?}"
    );
    let again = reopened(&bus, &proxy, 3).await;

    // A set-up that starts on a lost connection reconnects by itself; when
    // it then hangs, the connection it made is the one forgotten.
    let lost = bus.connection().await.expect("the live connection");
    lost.close(200, "lost, for the test".into())
        .await
        .expect("closed");
    let start = async {
        let ch = bus.channel().await?;
        proxy.set_muted(true);
        ch.basic_consume(
            queue.as_str().into(),
            "muted-again".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
        Ok::<_, BusError>(())
    };
    let consuming = bus
        .within("starting the consumer", Duration::from_secs(2), start)
        .await;
    assert!(
        matches!(consuming, Err(BusError::TimedOut { .. })),
        "{consuming:?}"
    );
    assert_eq!(proxy.accepted(), 4, "it reconnected");
    let last = reopened(&bus, &proxy, 5).await;
    drop(again);
    let _ = last
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = last.close(200, "done".into()).await;
    bus.close().await;
}

/// A queue `{namespace}.{suffix}`, declared on `ch`; its name.
async fn declared_queue(ch: &lapin::Channel, suffix: &str) -> String {
    let queue = format!("{}.{suffix}", namespace());
    ch.queue_declare(
        queue.as_str().into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .expect("queue");
    queue
}
