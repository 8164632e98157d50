//! `verimail listen`: every matching event as one JSON line, exit 0 on
//! SIGTERM.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::common::{self, Broker, namespace};
use crate::support::command;

#[tokio::test]
async fn listen_prints_each_event_as_a_json_line_and_exits_0_on_sigterm() {
    let ns = namespace();
    let broker = Broker::new(&ns).await;
    let mut child = command(&ns, &[], &["listen", "verimail.verification.*"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("listen starts");
    let mut err = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut out = BufReader::new(child.stdout.take().expect("stdout")).lines();
    // It says on stderr when it is bound.
    let ready = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = err.next_line().await.expect("stderr readable") {
            if line.starts_with("listening on") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(ready.ok(), Some(true), "listen said it was bound");

    // A request and an outcome match; a verified event does not.
    let config = common::config(&ns);
    let producer = verimail_producer::Producer::connect_once(&config)
        .await
        .expect("producer");
    let id = producer
        .request_verification(verimail_producer::VerificationRequest::new(
            "7",
            "b@example.com",
        ))
        .await
        .expect("published");
    let publisher = verimail_shared::bus::Publisher::new(
        verimail_shared::bus::Bus::connect_once(&config.amqp_urls, "test")
            .await
            .expect("bus"),
    );
    // A pretty-printed body still comes out as one line.
    let pretty = serde_json::to_vec_pretty(&serde_json::json!({
        "specversion":"1.0","id":"o-1","source":"/verimail/worker","type":"verimail.verification.throttled",
        "data":{"request_id":id,"retry_after_seconds":3}})).expect("JSON");
    let topology = verimail_shared::bus::Topology::new(ns.clone());
    let mine = format!("{ns}.sub.sink");
    broker.bind(&mine, "#").await; // so the unmatched event is routable
    for (ty, event_id, body) in [
        (
            "verimail.email.verified",
            "v-1",
            br#"{"type":"verimail.email.verified","id":"v-1"}"#.to_vec(),
        ),
        ("verimail.verification.throttled", "o-1", pretty),
    ] {
        publisher
            .publish(&verimail_shared::bus::Outgoing::event(
                &topology, ty, event_id, &body,
            ))
            .await
            .expect("published");
    }
    let mut seen = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        while seen.len() < 2 {
            match out.next_line().await.expect("stdout readable") {
                Some(line) => seen.push(serde_json::from_str::<Value>(&line).expect("a JSON line")),
                None => break,
            }
        }
    })
    .await;
    assert!(read.is_ok(), "two lines within 10 s, got {seen:?}");
    assert_eq!(seen[0]["id"], id.as_str());
    assert_eq!(seen[0]["type"], "verimail.verification.requested");
    assert_eq!(seen[1]["id"], "o-1");

    let pid = child.id().expect("a pid").to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    assert!(kill.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("listen ends within 10 s")
        .expect("wait works");
    assert_eq!(status.code(), Some(0));
    producer.close().await;
    broker.cleanup(&[&mine]).await;
}
