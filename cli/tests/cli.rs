//! The `verimail` binary against the real RabbitMQ and PostgreSQL, each test
//! in a namespace of its own.

// The broker helpers of the client library's tests (a namespace per test,
// direct access to queues), shared rather than copied.
#[path = "../../producer/tests/common/mod.rs"]
mod common;

use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::{Broker, header, namespace, request_body};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use verimail_shared::bus::dead_letter_headers;

const BIN: &str = env!("CARGO_BIN_EXE_verimail");
const SECRET: &str = "cli-test-secret";

/// The command with a clean environment: only what the test gives.
fn command(ns: &str, env: &[(&str, &str)], args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .current_dir(std::env::temp_dir())
        .env("VERIMAIL_NAMESPACE", ns)
        .env("AMQP_URL", common::AMQP_URL)
        .args(args)
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

async fn run(ns: &str, env: &[(&str, &str)], args: &[&str]) -> Output {
    let output = command(ns, env, args)
        .output()
        .await
        .expect("the binary runs");
    eprintln!(
        "verimail {args:?} -> {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json_lines(o: &Output) -> Vec<Value> {
    stdout(o)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

#[tokio::test]
async fn publish_prints_the_event_id_and_the_request_lands_on_the_exchange() {
    let ns = namespace();
    let broker = Broker::new(&ns).await;
    let mine = format!("{ns}.sub.check");
    broker.bind(&mine, "verimail.verification.requested").await;

    let out = run(
        &ns,
        &[],
        &[
            "publish",
            "--user-id",
            "42",
            "--email",
            "alice@example.com",
            "--name",
            "Alice",
            "--locale",
            "zh-CN",
            "--context",
            r#"{"signup_flow":"b"}"#,
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0));
    let id = stdout(&out).trim().to_owned();
    assert!(!id.is_empty() && !id.contains('\n'), "one id: {id:?}");

    let delivery = broker.take(&mine).await.expect("the request landed");
    assert_eq!(
        delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some(id.as_str())
    );
    assert_eq!(
        delivery
            .properties
            .content_type()
            .as_ref()
            .map(|s| s.as_str()),
        Some("application/cloudevents+json")
    );
    assert_eq!(*delivery.properties.delivery_mode(), Some(2));
    let body: Value = serde_json::from_slice(&delivery.data).expect("JSON body");
    assert_eq!(body["id"], id.as_str());
    assert_eq!(body["type"], "verimail.verification.requested");
    assert_eq!(body["data"]["email"], "alice@example.com");
    assert_eq!(body["data"]["context"]["signup_flow"], "b");
    assert_eq!(broker.count(&broker.topology.worker_queue()).await, 1);

    // A chosen id is kept.
    let out = run(
        &ns,
        &[],
        &[
            "publish",
            "--user-id",
            "42",
            "--email",
            "a@example.com",
            "--id",
            "mine-1",
        ],
    )
    .await;
    assert_eq!(stdout(&out).trim(), "mine-1");
    broker.cleanup(&[&mine]).await;
}

#[tokio::test]
async fn a_field_breaking_a_rule_is_a_usage_error_naming_its_flag() {
    let ns = namespace();
    let cases: &[(&[&str], &str)] = &[
        (&["--email", "not-an-address"], "--email: "),
        (
            &["--email", "a@example.com", "--locale", "not a tag"],
            "--locale: ",
        ),
        (
            &["--email", "a@example.com", "--context", "[1]"],
            "--context: ",
        ),
        (
            &["--email", "a@example.com", "--context", "{nope"],
            "--context: not JSON",
        ),
        (
            &["--email", "a@example.com", "--return-url", "/relative"],
            "--return-url: ",
        ),
        (
            &["--email", "a@example.com", "--purpose", "reset_password"],
            "--return-url: required",
        ),
        (
            &["--email", "a@example.com", "--purpose", "delete_account"],
            "--purpose",
        ),
        (
            &["--email", "a@example.com", "--name", &"x".repeat(300)],
            "--name: ",
        ),
        (
            &["--email", "a@example.com", "--id", &"x".repeat(129)],
            "--id: ",
        ),
    ];
    for (extra, expected) in cases {
        let mut args = vec!["publish", "--user-id", "42"];
        args.extend_from_slice(extra);
        // A closed port: a usage error must not even try the broker.
        let out = run(
            &ns,
            &[("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")],
            &args,
        )
        .await;
        assert_eq!(out.status.code(), Some(2), "{extra:?}");
        assert!(
            stderr(&out).contains(expected),
            "{extra:?}: {}",
            stderr(&out)
        );
        assert!(stdout(&out).is_empty());
    }
    let out = run(&ns, &[], &["publish", "--email", "a@example.com"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--user-id"));
}

#[tokio::test]
async fn a_return_url_outside_a_configured_allowlist_is_a_usage_error() {
    let ns = namespace();
    let out = run(
        &ns,
        &[
            ("RETURN_URL_ALLOWLIST", "https://app.example.com"),
            ("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f"),
        ],
        &[
            "publish",
            "--user-id",
            "1",
            "--email",
            "a@example.com",
            "--return-url",
            "https://evil.example.net/x",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--return-url: origin https://evil.example.net"));
}

fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("an address").port()
}

#[tokio::test]
async fn an_unreachable_broker_fails_fast_with_exit_1() {
    let ns = namespace();
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", closed_port());
    for args in [
        &["publish", "--user-id", "1", "--email", "a@example.com"][..],
        &["dead", "list"][..],
        &["dead", "replay", "--all"][..],
        &["listen"][..],
    ] {
        let started = Instant::now();
        let out = run(&ns, &[("AMQP_URL", &url)], args).await;
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{args:?} took {:?}",
            started.elapsed()
        );
        assert!(
            stderr(&out).contains("no RabbitMQ node answered"),
            "{args:?}"
        );
        assert!(
            !stderr(&out).contains(":guest@"),
            "the password is redacted"
        );
    }
}

#[tokio::test]
async fn a_wrong_variable_fails_with_exit_1_and_a_wrong_flag_with_exit_2() {
    let ns = namespace();
    let out = run(
        &ns,
        &[
            ("TOKEN_TTL_SECONDS", "soon"),
            ("VERIMAIL_SECRET_KEY", SECRET),
        ],
        &["token", "mint", "--email", "alice@example.com"],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("error: TOKEN_TTL_SECONDS: "),
        "{}",
        stderr(&out)
    );

    let out = run(&ns, &[], &["--namespace", "a b", "dead", "list"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).starts_with("error: --namespace: "),
        "{}",
        stderr(&out)
    );

    let out = run(&ns, &[], &["dead", "replay"]).await;
    assert_eq!(out.status.code(), Some(2), "replay needs --id or --all");
    let out = run(&ns, &[], &["dead", "replay", "--id", "x", "--all"]).await;
    assert_eq!(out.status.code(), Some(2), "not both");
}

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

async fn inspect(ns: &str, env: &[(&str, &str)], token: &str) -> (Option<i32>, Value) {
    let out = run(ns, env, &["token", "inspect", token]).await;
    let object = serde_json::from_str(stdout(&out).trim()).expect("one JSON object");
    (out.status.code(), object)
}

#[tokio::test]
async fn a_minted_token_inspects_as_valid_and_a_tampered_one_as_invalid() {
    let ns = namespace();
    let env = [("VERIMAIL_SECRET_KEY", SECRET)];
    let out = run(
        &ns,
        &env,
        &[
            "token",
            "mint",
            "--email",
            "alice@example.com",
            "--user-id",
            "42",
            "--purpose",
            "reset_password",
            "--locale",
            "zh-CN",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0));
    let token = stdout(&out).trim().to_owned();
    assert!(token.starts_with("v1."), "{token}");
    assert!(!stderr(&out).contains(&token), "the token is not logged");

    let (code, object) = inspect(&ns, &env, &token).await;
    assert_eq!(code, Some(0));
    assert_eq!(object["status"], "valid");
    assert_eq!(object["format"], "v1");
    assert_eq!(object["payload"]["email"], "alice@example.com");
    assert_eq!(object["payload"]["user_id"], "42");
    assert_eq!(object["payload"]["purpose"], "reset_password");
    assert!(object["issued_at"].is_string() && object["expires_at"].is_string());

    // The same token inside a link is recognised.
    let (code, _) = inspect(
        &ns,
        &env,
        &format!("http://127.0.0.1:8080/confirm/{token}?x=1"),
    )
    .await;
    assert_eq!(code, Some(0));

    // One character changed in the payload.
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let flipped = if parts[2].ends_with('A') { 'B' } else { 'A' };
    parts[2].pop();
    parts[2].push(flipped);
    let (code, object) = inspect(&ns, &env, &parts.join(".")).await;
    assert_eq!(code, Some(1));
    assert_eq!(object["status"], "invalid");
    assert_eq!(object["payload"], Value::Null);

    // Another secret does not accept it.
    let (code, object) = inspect(&ns, &[("VERIMAIL_SECRET_KEY", "other")], &token).await;
    assert_eq!(
        (code, object["status"].clone()),
        (Some(1), Value::from("invalid"))
    );

    // A bad email is a usage error; no secret is a configuration failure.
    let out = run(&ns, &env, &["token", "mint", "--email", "nope"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--email"));
    let out = run(&ns, &[], &["token", "mint", "--email", "a@example.com"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("VERIMAIL_SECRET_KEY"));
}

#[tokio::test]
async fn an_expired_token_inspects_as_expired_with_exit_1() {
    let ns = namespace();
    let env = [("VERIMAIL_SECRET_KEY", SECRET), ("TOKEN_TTL_SECONDS", "1")];
    let out = run(
        &ns,
        &env,
        &["token", "mint", "--email", "alice@example.com"],
    )
    .await;
    let token = stdout(&out).trim().to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, object) = inspect(&ns, &env, &token).await;
        if object["status"] == "expired" {
            assert_eq!(code, Some(1));
            assert_eq!(object["payload"]["email"], "alice@example.com");
            break;
        }
        assert_eq!(object["status"], "valid");
        assert!(Instant::now() < deadline, "the token expires after 1 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn an_itsdangerous_token_is_recognised_whatever_the_configured_format() {
    let ns = namespace();
    let minting = [
        ("VERIMAIL_SECRET_KEY", SECRET),
        ("TOKEN_FORMAT", "itsdangerous"),
    ];
    let out = run(
        &ns,
        &minting,
        &["token", "mint", "--email", "alice@example.com"],
    )
    .await;
    assert_eq!(out.status.code(), Some(0));
    let token = stdout(&out).trim().to_owned();
    assert!(!token.starts_with("v1."));
    assert_eq!(
        token.split('.').count(),
        3,
        "payload.timestamp.signature: {token}"
    );

    // Inspected under the default TOKEN_FORMAT=v1.
    let (code, object) = inspect(&ns, &[("VERIMAIL_SECRET_KEY", SECRET)], &token).await;
    assert_eq!(code, Some(0));
    assert_eq!(object["status"], "valid");
    assert_eq!(object["format"], "itsdangerous");
    assert_eq!(object["payload"], "alice@example.com");

    // `-` reads the token from stdin (kept out of the process list).
    let mut child = command(
        &ns,
        &[("VERIMAIL_SECRET_KEY", SECRET)],
        &["token", "inspect", "-"],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .spawn()
    .expect("inspect starts");
    let mut stdin = child.stdin.take().expect("stdin");
    tokio::io::AsyncWriteExt::write_all(&mut stdin, format!("{token}\n").as_bytes())
        .await
        .expect("write the token");
    drop(stdin);
    let out = child.wait_with_output().await.expect("inspect ends");
    assert_eq!(out.status.code(), Some(0));
    let object: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(object["format"], "itsdangerous");
}

#[tokio::test]
async fn migrate_applies_the_migrations_once() {
    let ns = namespace();
    let name = format!("verimail_cli_{}", uuid::Uuid::new_v4().simple());
    let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
    let env = [("DATABASE_URL", url.as_str())];
    let first = run(&ns, &env, &["migrate"]).await;
    assert_eq!(first.status.code(), Some(0));
    assert!(
        stderr(&first).contains("applied 20261126000001"),
        "{}",
        stderr(&first)
    );
    let second = run(&ns, &env, &["migrate"]).await;
    assert_eq!(second.status.code(), Some(0));
    assert!(stderr(&second).contains("nothing to apply"));
    assert!(stdout(&second).is_empty());

    let unreachable = run(
        &ns,
        &[("DATABASE_URL", "postgres://postgres@127.0.0.1:1/x")],
        &["migrate"],
    )
    .await;
    assert_eq!(unreachable.status.code(), Some(1));

    // Best effort: drop the test database.
    if let Ok(mut conn) = <sqlx::PgConnection as sqlx::Connection>::connect(
        "postgres://postgres@127.0.0.1:5432/postgres",
    )
    .await
    {
        let drop = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(drop))
            .execute(&mut conn)
            .await;
    }
}

#[tokio::test]
async fn suppression_add_list_and_remove_keep_one_entry_per_address_in_any_case() {
    let ns = namespace();
    let name = format!("verimail_cli_{}", uuid::Uuid::new_v4().simple());
    let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
    let env = [("DATABASE_URL", url.as_str())];

    let empty = run(&ns, &env, &["suppression", "list"]).await;
    assert_eq!(empty.status.code(), Some(0));
    assert!(stdout(&empty).is_empty());

    let added = run(&ns, &env, &["suppression", "add", "Alice@Example.com"]).await;
    assert_eq!(added.status.code(), Some(0));
    let entry = &json_lines(&added)[0];
    assert_eq!(entry["email"], "Alice@Example.com");
    assert_eq!(entry["reason"], "manual");
    assert_eq!(entry["source"], "cli");
    assert!(
        entry["created_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    let bob = run(
        &ns,
        &env,
        &[
            "suppression",
            "add",
            "bob@example.com",
            "--reason",
            "complaint",
        ],
    )
    .await;
    assert_eq!(json_lines(&bob)[0]["reason"], "complaint");
    // Again, in another case: the entry stays as it was.
    let again = run(
        &ns,
        &env,
        &[
            "suppression",
            "add",
            "ALICE@example.com",
            "--reason",
            "bounce",
        ],
    )
    .await;
    assert_eq!(again.status.code(), Some(0));
    assert_eq!(json_lines(&again)[0]["reason"], "manual");

    let all = run(&ns, &env, &["suppression", "list"]).await;
    let lines = json_lines(&all);
    assert_eq!(lines.len(), 2, "{}", stdout(&all));
    let keys: Vec<Vec<&String>> = lines
        .iter()
        .map(|l| {
            l.as_object()
                .map(|o| o.keys().collect())
                .unwrap_or_default()
        })
        .collect();
    assert!(
        keys.iter()
            .all(|k| k == &["created_at", "email", "reason", "source"])
    );
    let one = run(
        &ns,
        &env,
        &["suppression", "list", "--email", "alice@EXAMPLE.com"],
    )
    .await;
    assert_eq!(json_lines(&one).len(), 1);
    assert_eq!(json_lines(&one)[0]["email"], "Alice@Example.com");

    for bad in [
        vec!["suppression", "add", "not-an-address"],
        vec!["suppression", "add", "c@example.com", "--reason", "spam"],
        vec!["suppression", "remove"],
    ] {
        let out = run(&ns, &env, &bad).await;
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
    }

    let removed = run(&ns, &env, &["suppression", "remove", "alice@example.com"]).await;
    assert_eq!(removed.status.code(), Some(0));
    let absent = run(&ns, &env, &["suppression", "remove", "alice@example.com"]).await;
    assert_eq!(absent.status.code(), Some(1));
    assert!(stderr(&absent).contains("not on the suppression list"));
    let left = run(&ns, &env, &["suppression", "list"]).await;
    assert_eq!(json_lines(&left).len(), 1);
    assert_eq!(json_lines(&left)[0]["email"], "bob@example.com");

    if let Ok(mut conn) = <sqlx::PgConnection as sqlx::Connection>::connect(
        "postgres://postgres@127.0.0.1:5432/postgres",
    )
    .await
    {
        let drop = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(drop))
            .execute(&mut conn)
            .await;
    }
}

#[tokio::test]
async fn help_and_version_exit_0_and_demo_is_a_subcommand() {
    let ns = namespace();
    let out = run(&ns, &[], &["--version"]).await;
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).starts_with("verimail "));
    for args in [
        &["--help"][..],
        &["publish", "--help"][..],
        &["dead", "replay", "--help"][..],
    ] {
        let out = run(&ns, &[], args).await;
        assert_eq!(out.status.code(), Some(0));
        assert!(
            stdout(&out).contains("Example"),
            "{args:?} teaches by example"
        );
    }
    let out = run(&ns, &[], &["demo", "--help"]).await;
    assert_eq!(out.status.code(), Some(0));
    let out = run(&ns, &[], &["no-such-command"]).await;
    assert_eq!(out.status.code(), Some(2));
}

/// A mail as the worker writes it: a base64 text part and a quoted-printable
/// HTML part whose link is cut by soft line breaks.
fn eml(to: &str, link: &str) -> String {
    use std::fmt::Write as _;
    let text = format!(
        "Please confirm your address:\r\n\r\n{link}\r\n\r\nSee https://example.com/help\r\n"
    );
    let b64 = base64_lines(text.as_bytes());
    let html = format!("<p><a href=3D\"{link}\">Confirm</a></p>");
    let mut qp = String::new();
    for (i, c) in html.chars().enumerate() {
        if i > 0 && i % 60 == 0 {
            qp.push_str("=\r\n");
        }
        let _ = write!(qp, "{c}");
    }
    format!(
        "From: verimail <no-reply@localhost>\r\nTo: \"Ada\" <{to}>\r\nSubject: Confirm your email address\r\n\
         MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=\"b1\"\r\n\r\n\
         --b1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n{b64}\r\n\
         --b1\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n{qp}\r\n\
         --b1--\r\n"
    )
}

fn base64_lines(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
        if out.len() % 78 == 76 {
            out.push_str("\r\n");
        }
    }
    out
}

#[tokio::test]
async fn outbox_prints_the_mail_of_a_request_or_the_latest_and_exit_1_without_one() {
    let ns = namespace();
    let dir = std::env::temp_dir().join(format!("verimail-cli-outbox-{ns}"));
    std::fs::create_dir_all(&dir).expect("an outbox");
    let mail_url = format!("file://{}", dir.display());
    let env = [("MAIL_URL", mail_url.as_str())];
    let link = "http://127.0.0.1:8080/confirm/v1.KxYKljBC.AJb6vbANAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA.cxf1GJe0FyriWp9N7zb1Bp2jufi2UsEzbSER3H6-Nus";

    let out = run(&ns, &env, &["outbox"]).await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "an empty outbox has no latest mail"
    );

    std::fs::write(dir.join("req-1.eml"), eml("ada@example.com", link)).expect("write");
    // Written later, so the latest; its id has a `/`, encoded in the file name.
    std::thread::sleep(Duration::from_millis(20));
    let other = link.replace("v1.", "v1.other");
    std::fs::write(dir.join("signup%2F2.eml"), eml("bob@example.com", &other)).expect("write");

    let out = run(&ns, &env, &["outbox", "req-1"]).await;
    assert_eq!(out.status.code(), Some(0));
    let mail: Value = serde_json::from_str(stdout(&out).trim()).expect("one JSON object");
    assert_eq!(mail["request_id"], "req-1");
    assert_eq!(mail["to"], "ada@example.com");
    assert_eq!(mail["subject"], "Confirm your email address");
    assert_eq!(mail["link"], link, "decoded from the base64 part");
    assert_eq!(mail["code"], Value::Null);
    assert_eq!(mail["file"], dir.join("req-1.eml").display().to_string());

    let out = run(&ns, &env, &["outbox"]).await;
    assert_eq!(out.status.code(), Some(0));
    let latest: Value = serde_json::from_str(stdout(&out).trim()).expect("one JSON object");
    assert_eq!(latest["request_id"], "signup/2");
    assert_eq!(latest["link"], other.as_str());
    let out = run(&ns, &env, &["outbox", "signup/2"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // --wait: the mail written while the command waits for it.
    let waiting = command(&ns, &env, &["outbox", "late-1", "--wait", "20"]).output();
    let writer = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        std::fs::write(dir.join("late-1.eml"), eml("ada@example.com", link)).expect("write");
    };
    let (out, ()) = tokio::join!(waiting, writer);
    let out = out.expect("the binary runs");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("\"request_id\":\"late-1\""));

    let out = run(&ns, &env, &["outbox", "no-such-request"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no-such-request"), "{}", stderr(&out));
    assert!(stdout(&out).is_empty());
    std::fs::remove_dir_all(&dir).expect("clean up");
}

#[tokio::test]
async fn a_command_ignores_variables_it_does_not_use_even_from_dotenv() {
    let ns = namespace();
    let broker = Broker::new(&ns).await;
    let mine = format!("{ns}.sub.check");
    broker.bind(&mine, "verimail.verification.requested").await;
    // The worker's and the gateway's variables, wrong, in the environment and in ./.env.
    let wrong = [
        ("THROTTLE_SECONDS", "soon"),
        ("WORKER_CONCURRENCY", "0"),
        ("GATEWAY_ADDR", "nowhere"),
        ("MAIL_URL", "pigeon://coop"),
    ];
    let folder = std::env::temp_dir().join(format!("verimail-cli-dotenv-{ns}"));
    std::fs::create_dir_all(&folder).expect("a folder");
    std::fs::write(
        folder.join(".env"),
        "THROTTLE_SECONDS=later\nCONFIRM_RATE_LIMIT_PER_MINUTE=none\nPUBLIC_BASE_URL=ftp://x\n",
    )
    .expect("write .env");
    let publish = ["publish", "--user-id", "42", "--email", "alice@example.com"];
    let out = command(&ns, &wrong, &publish)
        .current_dir(&folder)
        .output()
        .await
        .expect("the binary runs");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(broker.take(&mine).await.is_some(), "the request landed");

    let out = command(&ns, &wrong, &["token", "inspect", "v1.a.b.c"])
        .env("VERIMAIL_SECRET_KEY", SECRET)
        .env("AMQP_URL", "not a url")
        .current_dir(&folder)
        .output()
        .await
        .expect("the binary runs");
    assert_eq!(
        out.status.code(),
        Some(1),
        "invalid, not a configuration error"
    );
    let answer: Value = serde_json::from_slice(&out.stdout).expect("the inspection");
    assert_eq!(answer["status"], "invalid");

    // A variable the command does use is still checked.
    let out = command(&ns, &[("AMQP_URL", "not a url")], &publish)
        .output()
        .await
        .expect("the binary runs");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("error: AMQP_URL: "),
        "{}",
        stderr(&out)
    );
    std::fs::remove_dir_all(&folder).expect("clean up");
    broker.cleanup(&[&mine]).await;
}

#[tokio::test]
async fn help_does_not_show_an_unset_namespace_as_empty() {
    let ns = namespace();
    let out = command(&ns, &[], &["--help"])
        .env_remove("VERIMAIL_NAMESPACE")
        .output()
        .await
        .expect("the binary runs");
    assert_eq!(out.status.code(), Some(0));
    assert!(
        !stdout(&out).contains("VERIMAIL_NAMESPACE="),
        "{}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains("verimail outbox"),
        "the outbox is taught"
    );
}
