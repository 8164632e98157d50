//! Several targets and workers: a Retry-After pauses the target for every
//! worker of the namespace; failover sends each mail once through the next
//! target and returns to the first once it is back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use verimail_tests::api::{ApiSink, Reply};
use verimail_tests::env::free_port;

use crate::WAIT;
use crate::support::{Deployment, kind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_pauses_the_target_for_every_worker_of_the_namespace() {
    // The first request is answered 429 with Retry-After: 3; the rest 200.
    let first = Arc::new(Mutex::new(None::<Instant>));
    let f = first.clone();
    let sink = ApiSink::start(move |_| {
        let mut first = f.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if first.is_none() {
            *first = Some(Instant::now());
            return Reply::json(429, json!({"error": "slow down"})).with_header("retry-after", "3");
        }
        Reply::json(200, json!({"id": "pid-ok"}))
    })
    .await
    .expect("the stand-in starts");
    let d = Deployment::start("pause", 2, |env| {
        env.set("MAIL_URL", format!("{}/mail", sink.base()));
        env.set("WORKER_CONCURRENCY", "4");
    })
    .await;
    d.publish("pause-0", "first@example.com").await;
    let paused_at = verimail_tests::tap::eventually(WAIT, || async {
        *first
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    })
    .await
    .expect("the stand-in saw the first request");
    // Both workers take some of these (round robin over two consumers).
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 1..=12 {
        d.publish(&format!("pause-{i}"), &format!("user{i}@example.com"))
            .await;
    }
    for i in 0..=12 {
        assert_eq!(kind(&d.outcome(&format!("pause-{i}")).await).0, "sent");
    }
    let received = sink.received();
    assert_eq!(
        received.len(),
        14,
        "one 429, then each of the 13 mails once"
    );
    for r in &received[1..] {
        let after = r.at.duration_since(paused_at);
        assert!(
            after >= Duration::from_millis(2900),
            "a mail went out {after:?} into a 3 s pause"
        );
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_sends_each_mail_once_through_the_second_target_and_returns_to_the_first() {
    let primary = ApiSink::start(|_| Reply::json(503, json!({"error": "maintenance"})))
        .await
        .expect("the stand-in starts");
    let secondary = ApiSink::accepting().await.expect("the stand-in starts");
    let closed = free_port();
    let d = Deployment::start("failover", 1, |env| {
        env.set(
            "MAIL_URL",
            format!(
                "{}/mail , http://127.0.0.1:{closed}/mail , {}/mail",
                primary.base(),
                secondary.base()
            ),
        );
    })
    .await;
    let ids = |from: usize, to: usize| (from..to).map(|i| format!("fo-{i}")).collect::<Vec<_>>();
    for id in ids(0, 20) {
        d.publish(&id, &format!("{id}@example.com")).await;
    }
    for id in ids(0, 20) {
        assert_eq!(kind(&d.outcome(&id).await).0, "sent", "{id}");
    }
    let by_id = |sink: &ApiSink| {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for r in sink.received() {
            *counts
                .entry(
                    r.json()["request_id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                )
                .or_default() += 1;
        }
        counts
    };
    let through_second = by_id(&secondary);
    assert_eq!(
        through_second.len(),
        20,
        "every mail went through the last target"
    );
    assert!(
        through_second.values().all(|n| *n == 1),
        "exactly one mail each: {through_second:?}"
    );

    // The first target comes back: it is used again, the others no more.
    primary.answer(|_| Reply::json(200, json!({"id": "pid-primary"})));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = secondary.count();
    for id in ids(20, 30) {
        d.publish(&id, &format!("{id}@example.com")).await;
    }
    for id in ids(20, 30) {
        assert_eq!(kind(&d.outcome(&id).await).0, "sent", "{id}");
    }
    assert_eq!(
        secondary.count(),
        before,
        "no mail through the fallback once the first is back"
    );
    let through_first = by_id(&primary);
    for id in ids(20, 30) {
        assert_eq!(through_first.get(&id), Some(&1), "{id}");
    }
    d.stop().await;
}
