//! What the relay publishes: a click wakes it, each event reaches a bound
//! queue once with confirms (even with two relays racing), and an event no
//! queue is bound to stays in the outbox until one is.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use verimail_gateway::BusSlot;
use verimail_shared::events::{EMAIL_VERIFIED, Event};

use crate::common::*;
use crate::{Subscriber, connect, event_id_of, exchange_only};

#[tokio::test]
async fn the_verified_event_reaches_a_queue_bound_to_the_exchange() {
    let (_, _, namespace) = config(&[]);
    let sub = Subscriber::new(&namespace).await;
    let bus = connect("gateway-relay").await;
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
        let bus = connect(name).await;
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
    let bus = exchange_only(&namespace, "relay-unroutable").await;
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

    sub.cleanup().await;
    app.cleanup().await;
}
