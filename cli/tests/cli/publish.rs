//! `verimail publish`: the request lands on the exchange as the contract
//! says, and a field breaking a rule is a usage error (exit 2) naming its
//! flag, before any broker is tried.

use serde_json::Value;

use crate::common::{Broker, namespace};
use crate::support::{run, stderr, stdout};

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
