//! `verimail dead list` and `verimail dead replay`: letters the worker and
//! the broker dead-lettered, listed without being consumed, replayed by id or
//! all at once; what cannot be replayed stays.

use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde_json::Value;
use verimail_shared::bus::dead_letter_headers;

use crate::common::{Broker, header, namespace, request_body};
use crate::support::{json_lines, run, stderr, stdout};

fn broker_moved_headers(ns: &str) -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from("x-first-death-reason"),
        AMQPValue::LongString("delivery_limit".into()),
    );
    headers.insert(
        ShortString::from("x-first-death-queue"),
        AMQPValue::LongString(format!("{ns}.worker").as_str().into()),
    );
    headers
}

/// Letters: a delivery_failed request, an undecodable body, one the broker
/// moved, one with an id but dead-lettered as undecodable, another request.
async fn fill_dead(broker: &Broker, ns: &str) {
    let ty = Some("verimail.verification.requested");
    broker
        .put_dead(
            &request_body("req-a", "a@example.com"),
            Some("req-a"),
            ty,
            dead_letter_headers("delivery_failed", "smtp: 451 try later"),
        )
        .await;
    broker
        .put_dead(
            b"not json at all",
            None,
            None,
            dead_letter_headers("undecodable", "not JSON"),
        )
        .await;
    broker
        .put_dead(
            &request_body("req-b", "b@example.com"),
            Some("req-b"),
            ty,
            broker_moved_headers(ns),
        )
        .await;
    broker
        .put_dead(
            br#"{"id":"odd-1","hello":1}"#,
            Some("odd-1"),
            None,
            dead_letter_headers("undecodable", "not a CloudEvent"),
        )
        .await;
    broker
        .put_dead(
            &request_body("req-c", "c@example.com"),
            Some("req-c"),
            ty,
            dead_letter_headers("delivery_failed", "smtp: timeout"),
        )
        .await;
}

#[tokio::test]
async fn dead_list_shows_every_letter_in_order_without_consuming_any() {
    let ns = namespace();
    let broker = Broker::new(&ns).await;
    fill_dead(&broker, &ns).await;

    let first = run(&ns, &[], &["dead", "list"]).await;
    assert_eq!(first.status.code(), Some(0));
    let letters = json_lines(&first);
    let ids: Vec<&Value> = letters.iter().map(|l| &l["id"]).collect();
    assert_eq!(
        ids,
        [
            &Value::from("req-a"),
            &Value::Null,
            &Value::from("req-b"),
            &Value::from("odd-1"),
            &Value::from("req-c")
        ]
    );
    assert_eq!(
        letters[0],
        serde_json::json!({"id":"req-a","type":"verimail.verification.requested",
            "reason":"delivery_failed","detail":"smtp: 451 try later",
            "bytes": request_body("req-a", "a@example.com").len()})
    );
    assert_eq!(letters[1]["reason"], "undecodable");
    assert_eq!(letters[1]["type"], Value::Null);
    assert_eq!(letters[1]["bytes"], 15);
    assert_eq!(letters[2]["reason"], "delivery_limit");
    assert_eq!(
        letters[2]["detail"],
        format!("moved by the broker from {ns}.worker").as_str()
    );

    // Nothing was consumed, nothing reordered.
    let second = run(&ns, &[], &["dead", "list"]).await;
    assert_eq!(stdout(&second), stdout(&first));
    assert_eq!(broker.count(&broker.topology.dead_queue()).await, 5);

    // An empty queue lists nothing.
    let empty_ns = namespace();
    let out = run(&empty_ns, &[], &["dead", "list"]).await;
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).is_empty());
    broker.cleanup(&[]).await;
    Broker::new(&empty_ns).await.cleanup(&[]).await;
}

#[tokio::test]
async fn dead_replay_by_id_republishes_that_letter_and_removes_only_it() {
    let ns = namespace();
    let broker = Broker::new(&ns).await;
    let mine = format!("{ns}.sub.replays");
    broker.bind(&mine, "verimail.verification.requested").await;
    fill_dead(&broker, &ns).await;

    let out = run(&ns, &[], &["dead", "replay", "--id", "req-b"]).await;
    assert_eq!(out.status.code(), Some(0));
    let replayed = json_lines(&out);
    assert_eq!(replayed.len(), 1);
    assert_eq!(replayed[0]["id"], "req-b");

    let copy = broker.take(&mine).await.expect("the copy was published");
    assert_eq!(copy.data, request_body("req-b", "b@example.com"));
    assert_eq!(
        copy.properties.message_id().as_ref().map(|s| s.as_str()),
        Some("req-b")
    );
    assert_eq!(copy.routing_key.as_str(), "verimail.verification.requested");
    assert_eq!(
        header(&copy, "x-verimail-replayed"),
        Some(AMQPValue::Boolean(true))
    );
    assert_eq!(
        header(&copy, "x-first-death-reason"),
        None,
        "the copy starts afresh"
    );

    let left = json_lines(&run(&ns, &[], &["dead", "list"]).await);
    let ids: Vec<&Value> = left.iter().map(|l| &l["id"]).collect();
    assert_eq!(
        ids,
        [
            &Value::from("req-a"),
            &Value::Null,
            &Value::from("odd-1"),
            &Value::from("req-c")
        ]
    );

    // An undecodable letter cannot be replayed by id; an unknown id is an error too.
    for id in ["odd-1", "no-such-letter"] {
        let out = run(&ns, &[], &["dead", "replay", "--id", id]).await;
        assert_eq!(out.status.code(), Some(1), "{id}");
        assert!(stdout(&out).is_empty());
        assert!(stderr(&out).contains(id));
    }
    assert_eq!(broker.count(&broker.topology.dead_queue()).await, 4);
    broker.cleanup(&[&mine]).await;
}

#[tokio::test]
async fn dead_replay_all_replays_what_it_can_and_says_how_many_it_left() {
    let ns = namespace();
    let broker = Broker::new(&ns).await;
    let mine = format!("{ns}.sub.replays");
    broker.bind(&mine, "verimail.verification.requested").await;
    fill_dead(&broker, &ns).await;

    let out = run(&ns, &[], &["dead", "replay", "--all"]).await;
    assert_eq!(out.status.code(), Some(0));
    let ids: Vec<Value> = json_lines(&out).iter().map(|l| l["id"].clone()).collect();
    assert_eq!(ids, ["req-a", "req-b", "req-c"]);
    assert!(
        stderr(&out).contains("2 undecodable letter(s)"),
        "{}",
        stderr(&out)
    );

    for id in ["req-a", "req-b", "req-c"] {
        let copy = broker.take(&mine).await.expect("a copy");
        assert_eq!(
            copy.properties.message_id().as_ref().map(|s| s.as_str()),
            Some(id)
        );
    }
    let left = json_lines(&run(&ns, &[], &["dead", "list"]).await);
    let ids: Vec<&Value> = left.iter().map(|l| &l["id"]).collect();
    assert_eq!(ids, [&Value::Null, &Value::from("odd-1")]);

    // Nothing replayable left: still done.
    let again = run(&ns, &[], &["dead", "replay", "--all"]).await;
    assert_eq!(again.status.code(), Some(0));
    assert!(stdout(&again).is_empty());
    broker.cleanup(&[&mine]).await;
}

#[tokio::test]
async fn a_replay_the_broker_cannot_route_fails_and_leaves_the_letter() {
    let ns = namespace();
    let broker = Broker::new(&ns).await;
    // An event type no queue is bound to: the mandatory copy comes back.
    broker
        .put_dead(br#"{"specversion":"1.0","id":"lost-1","source":"/x","type":"verimail.nobody.listens","data":{}}"#,
            Some("lost-1"), None, dead_letter_headers("delivery_failed", "x"))
        .await;
    let out = run(&ns, &[], &["dead", "replay", "--all"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("lost-1"), "{}", stderr(&out));
    assert_eq!(broker.count(&broker.topology.dead_queue()).await, 1);
    broker.cleanup(&[]).await;
}
