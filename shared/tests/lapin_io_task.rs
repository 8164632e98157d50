//! Keeps `vendor/lapin` honest: lapin 4.12 runs each connection's I/O loop on
//! an OS thread of its own (`lapin-io-loop`), so every frame in either
//! direction crossed threads; the patch (vendor/README.md) runs the loop as a
//! task on the connection's runtime. If the patch is lost (a `cargo update`
//! past the `[patch]`, a lapin release without it), the first test fails.
//!
//! The second test is what the patch must not break: the whole exchange a
//! service does (publish with a confirm, consume, ack) on a runtime with a
//! single thread, where nothing but the runtime drives the loop.
//!
//! Against the real RabbitMQ (127.0.0.1:5672, guest/guest), as the bus tests.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Names of this process's threads (`/proc/self/task/*/comm`).
fn thread_names() -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|n| n.trim().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_starts_no_io_thread_of_its_own() {
    let conn = Connection::connect(URL, ConnectionProperties::default())
        .await
        .expect("broker");
    let channel = conn.create_channel().await.expect("channel");
    // A round trip, so the loop has read and written.
    channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("queue.declare answered");
    let names = thread_names();
    assert!(!names.is_empty(), "no /proc/self/task to read");
    assert!(
        !names.iter().any(|n| n.starts_with("lapin-io")),
        "lapin runs its I/O loop on a thread of its own again: is vendor/lapin's \
         [patch] still applied? threads: {names:?}"
    );
    conn.close(200, "done".into()).await.expect("close");
}

#[tokio::test(flavor = "current_thread")]
async fn publish_confirm_consume_and_ack_on_a_single_threaded_runtime() {
    let conn = Connection::connect(URL, ConnectionProperties::default())
        .await
        .expect("broker");
    let channel = conn.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let queue = format!(
        "t-lapin-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("queue");
    const N: usize = 500;
    let mut confirms = Vec::with_capacity(N);
    for i in 0..N {
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                format!("message {i}").as_bytes(),
                BasicProperties::default(),
            )
            .await
            .expect("publish");
        confirms.push(confirm);
    }
    for confirm in confirms {
        let confirmation = confirm.await.expect("confirm");
        assert!(confirmation.is_ack(), "{confirmation:?}");
    }
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "t-lapin".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    for i in 0..N {
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("a delivery within 10 s")
            .expect("consumer open")
            .expect("delivery");
        assert_eq!(delivery.data, format!("message {i}").as_bytes());
        delivery.ack(BasicAckOptions::default()).await.expect("ack");
    }
    let deleted = channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("queue.delete");
    assert_eq!(deleted, 0, "every message was acked");
    conn.close(200, "done".into()).await.expect("close");
}
