//! What holds for every provider: one not in `WEBHOOK_SECRETS` answers 404,
//! metrics count notifications by provider and result, the events reach the
//! bus, and no input at all is answered with a server error.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use serde_json::json;
use verimail_gateway::{AppState, BusSlot};

use crate::common::*;
use crate::mailgun::{MAILGUN_KEY, mailgun_body};
use crate::postmark::{POSTMARK, basic_auth};
use crate::sendgrid::SendgridKey;
use crate::ses::{CERT_URL, SnsCert, TOPIC};
use crate::support::{KEY, Watcher, api, app, post, suppressions};

#[tokio::test]
async fn a_provider_not_in_webhook_secrets_answers_404() {
    let app = TestApp::new(&[("WEBHOOK_SECRETS", "mailgun=key-only-mailgun-0123")]).await;
    for provider in ["sendgrid", "postmark", "ses", "sparkpost", "api"] {
        let answer = app.call(post(provider, "{}", &[])).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{provider}");
    }
    let answer = app.call(post("mailgun", "{}", &[])).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    app.cleanup().await;
}

#[tokio::test]
async fn metrics_count_notifications_by_provider_and_result_and_suppressions_by_reason() {
    let sg = SendgridKey::new();
    let (app, _) = app(&sg, &[]).await;
    let bounce = mailgun_body(
        "token-m1",
        json!({"event": "failed", "severity": "permanent", "recipient": "olga@example.com"}),
        MAILGUN_KEY,
    );
    app.call(post("mailgun", &bounce, &[])).await;
    app.call(post("mailgun", &bounce, &[])).await;
    app.call(post(
        "mailgun",
        &bounce.replace("token-m1", "token-m2"),
        &[],
    ))
    .await;
    app.call(api(
        "PUT",
        "/v1/suppressions/pat@example.com",
        Some(KEY),
        "",
    ))
    .await;
    let metrics = app.ops_get("/metrics").await.body;
    for line in [
        r#"verimail_gateway_webhook_notifications_total{provider="mailgun",result="acted"} 1"#,
        r#"verimail_gateway_webhook_notifications_total{provider="mailgun",result="duplicate"} 1"#,
        r#"verimail_gateway_webhook_notifications_total{provider="mailgun",result="unauthorized"} 1"#,
        r#"verimail_suppressions{reason="bounce"} 1"#,
        r#"verimail_suppressions{reason="manual"} 1"#,
        r#"verimail_suppressions{reason="complaint"} 0"#,
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} missing from:\n{metrics}"
        );
    }
    app.cleanup().await;
}

#[tokio::test]
async fn bounced_and_complained_events_reach_a_queue_bound_on_the_bus() {
    use verimail_shared::events::Event;

    let sg = SendgridKey::new();
    let (probe, _) = app(&sg, &[]).await;
    let tap = EventTap::bind(&probe.namespace, "deliverability", "verimail.email.#").await;
    // The same database and namespace, now with the broker.
    let state = AppState::with_fetch(
        &probe.config,
        probe.pool().clone(),
        BusSlot::with(tap.bus()),
        Arc::new(Watcher::default()),
    )
    .expect("configured");
    let stop = tokio_util::sync::CancellationToken::new();
    let relay = tokio::spawn(state.relay().run(stop.clone()));

    let body = json!([
        {"email": "quinn@example.com", "event": "bounce", "type": "bounce", "reason": "550 5.1.1",
         "sg_event_id": "bus-1", "timestamp": 1764950400},
        {"email": "rita@example.com", "event": "spamreport", "sg_event_id": "bus-2", "timestamp": 1764950400}
    ])
    .to_string();
    let answer = call(
        &state,
        post("sendgrid", &body, &sg.sign("1764950401", &body)),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);

    let mut got = Vec::new();
    while got.len() < 2 {
        match tap.next(Duration::from_secs(15)).await {
            Some(delivery) => got.push(delivery),
            None => break,
        }
    }
    assert_eq!(got.len(), 2, "both events arrive");
    for d in &got {
        let event = Event::decode(&d.data).expect("a verimail event");
        let message_id = d.properties.message_id().as_ref().map(|s| s.to_string());
        match event {
            Event::Bounced(e) => {
                assert_eq!(d.routing_key.as_str(), "verimail.email.bounced");
                assert_eq!(message_id.as_deref(), Some(e.id.as_str()));
                assert_eq!(e.data.notice.email, "quinn@example.com");
            }
            Event::Complained(e) => {
                assert_eq!(d.routing_key.as_str(), "verimail.email.complained");
                assert_eq!(message_id.as_deref(), Some(e.id.as_str()));
                assert_eq!(e.data.notice.email, "rita@example.com");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        eventually(Duration::from_secs(5), || async {
            probe.outbox().await.is_empty()
        })
        .await
    );

    stop.cancel();
    let _ = relay.await;
    tap.cleanup().await;
    probe.cleanup().await;
}

/// No input makes a webhook answer 5xx: garbage, wrong shapes, signed
/// nonsense, oversized bodies. The database is reachable, so 503 is wrong
/// too (except an SNS certificate that cannot be fetched, tested above).
#[tokio::test]
async fn no_webhook_input_is_answered_with_a_server_error() {
    let sg = SendgridKey::new();
    let (app, _) = app(&sg, &[]).await;
    let cert = SnsCert::new();
    sqlx::query("INSERT INTO sns_certificates (url, pem) VALUES ($1, $2)")
        .bind(CERT_URL)
        .bind(&cert.pem)
        .execute(app.pool())
        .await
        .expect("cache the certificate");
    /// Provider, body, headers.
    type Case = (&'static str, String, Vec<(String, String)>);
    let mut cases: Vec<Case> = Vec::new();
    let garbage = [
        String::new(),
        "null".into(),
        "[]".into(),
        "{}".into(),
        "\u{0}\u{1}\u{2}".into(),
        "[".repeat(10_000),
        "{\"a\":".repeat(5_000),
        json!({"signature": "x", "event-data": []}).to_string(),
        json!({"signature": {"timestamp": [], "token": {}, "signature": "zz"}}).to_string(),
        json!({"Type": 5}).to_string(),
        json!({"Type": "Notification", "SignatureVersion": "1", "Signature": "%%%",
               "SigningCertURL": CERT_URL, "Message": "m", "MessageId": "i",
               "Timestamp": "t", "TopicArn": TOPIC})
        .to_string(),
        json!({"RecordType": "Bounce", "ID": [], "Type": {}, "Email": 5}).to_string(),
        "x".repeat(5 * 1024 * 1024),
    ];
    for provider in ["mailgun", "sendgrid", "postmark", "ses"] {
        for body in &garbage {
            cases.push((provider, body.clone(), Vec::new()));
        }
    }
    // Authentic (signed) but malformed: the signature holds, the content does not.
    for body in [
        "[1, \"two\", null, {\"event\": 3}]",
        "[{\"email\": \"not an address\", \"event\": \"bounce\", \"sg_event_id\": \"h1\"}]",
        "[{\"email\": \"a@b.example\", \"event\": \"bounce\"}]",
        "{\"not\": \"an array\"}",
    ] {
        cases.push(("sendgrid", body.to_owned(), sg.sign("1", body).to_vec()));
    }
    let basic = basic_auth(POSTMARK);
    for body in [
        "[]",
        "{\"RecordType\": \"Bounce\", \"Type\": \"HardBounce\"}",
        "{\"ID\": 1, \"Type\": \"HardBounce\", \"Email\": \"@@\"}",
    ] {
        cases.push(("postmark", body.to_owned(), basic.clone()));
    }
    let weird_message = cert.message(
        "2",
        CERT_URL,
        json!({"Type": "Notification", "MessageId": "w1", "TopicArn": TOPIC,
               "Message": "{\"notificationType\": \"Bounce\", \"bounce\": {\"bouncedRecipients\": [1, {\"emailAddress\": []}]}}",
               "Timestamp": "2026-12-05T10:00:00.000Z"}),
    );
    cases.push(("ses", weird_message.to_string(), Vec::new()));
    cases.push((
        "mailgun",
        mailgun_body(
            "t-1",
            json!({"event": "failed", "recipient": ["x"]}),
            MAILGUN_KEY,
        ),
        Vec::new(),
    ));
    cases.push((
        "mailgun",
        mailgun_body("t-2", json!("a string"), MAILGUN_KEY),
        Vec::new(),
    ));
    for (provider, body, headers) in cases {
        let answer = app.call(post(provider, &body, &headers)).await;
        let shown: String = body.chars().take(80).collect();
        assert!(
            matches!(answer.status.as_u16(), 200 | 400 | 401 | 413),
            "{provider} {shown}: {} {}",
            answer.status,
            answer.body
        );
        if answer.status == StatusCode::BAD_REQUEST {
            assert!(answer.json()["detail"].is_string(), "{}", answer.body);
        }
    }
    // Only the one authentic, well-formed bounce (keyed without an
    // sg_event_id) suppressed anything.
    assert_eq!(
        suppressions(&app).await,
        [("a@b.example".into(), "bounce".into(), "sendgrid".into())]
    );
    app.cleanup().await;
}
