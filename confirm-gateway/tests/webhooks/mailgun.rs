//! Mailgun: `signature.signature` is HMAC-SHA256 of `timestamp` + `token`
//! with the webhook signing key (the event itself is not signed); the token
//! keys the notice.

use std::time::Duration;

use axum::http::StatusCode;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::common::*;
use crate::sendgrid::SendgridKey;
use crate::support::{app, events, post, suppressions};

/// The signing key in `WEBHOOK_SECRETS`.
pub const MAILGUN_KEY: &str = "key-mailgun-signing-0123456789";

/// The body Mailgun posts for `event`, signed with `key` as of `timestamp`
/// (seconds since the epoch).
pub fn mailgun_body_at(timestamp: i64, token: &str, event: Value, key: &str) -> String {
    let timestamp = timestamp.to_string();
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("key");
    mac.update(format!("{timestamp}{token}").as_bytes());
    let signature: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    json!({"signature": {"timestamp": timestamp, "token": token, "signature": signature},
           "event-data": event})
    .to_string()
}

/// The body Mailgun posts for `event`, signed with `key` now.
pub fn mailgun_body(token: &str, event: Value, key: &str) -> String {
    mailgun_body_at(now(), token, event, key)
}

/// Signs `event` with the configured key, now, as Mailgun does, and POSTs it.
pub async fn post_mailgun(app: &TestApp, token: &str, event: Value) -> Answer {
    app.call(post(
        "mailgun",
        &mailgun_body(token, event, MAILGUN_KEY),
        &[],
    ))
    .await
}

/// Seconds since the epoch.
fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

#[tokio::test]
async fn a_signed_mailgun_hard_bounce_suppresses_once_and_a_tampered_one_changes_nothing() {
    let sg = SendgridKey::new();
    let (app, _) = app(&sg, &[]).await;
    app.insert_request(
        "r1",
        "Bob@Example.com",
        "verify_email",
        None,
        None,
        Duration::ZERO,
    )
    .await;
    let event = json!({"event": "failed", "severity": "permanent", "reason": "bounce",
        "recipient": "bob@example.com", "timestamp": 1764950399.25, "id": "ev1",
        "delivery-status": {"code": 550, "message": "550 5.1.1 The email account does not exist"},
        "message": {"headers": {"message-id": "20261205.1@mg.example.com"}},
        "user-variables": {"request_id": "r1"}});
    let body = mailgun_body(
        "token-0001-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        event.clone(),
        MAILGUN_KEY,
    );

    // Mailgun signs timestamp + token (not the event): a changed token or
    // timestamp, another key, no signature: 401, nothing changes.
    let tampered = body.replace("token-0001", "token-0009");
    assert_ne!(tampered, body);
    let wrong_key = mailgun_body("token-0002", event.clone(), "another-signing-key");
    let unsigned = json!({"event-data": event}).to_string();
    for bad in [&tampered, &wrong_key, &unsigned] {
        let answer = app.call(post("mailgun", bad, &[])).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{}", answer.body);
        assert_eq!(answer.json(), json!({"status": "unauthorized"}));
    }
    assert!(suppressions(&app).await.is_empty());
    assert!(app.outbox().await.is_empty());

    for _ in 0..2 {
        let answer = app.call(post("mailgun", &body, &[])).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    }
    assert_eq!(
        suppressions(&app).await,
        [("bob@example.com".into(), "bounce".into(), "mailgun".into())]
    );
    // The token keys the notice: its signature replayed over another event
    // (Mailgun does not sign the event) has no effect either.
    let replayed = body.replace("bob@example.com", "carol@example.com");
    let answer = app.call(post("mailgun", &replayed, &[])).await;
    assert_eq!(answer.json()["duplicates"], 1, "{}", answer.body);
    let bounced = events(&app, "verimail.email.bounced").await;
    assert_eq!(
        bounced.len(),
        1,
        "the second delivery had no effect: {bounced:?}"
    );
    assert_eq!(
        bounced[0],
        json!({"email": "bob@example.com", "provider": "mailgun", "occurred_at": "2025-12-05T15:59:59.25Z",
               "detail": "550 5.1.1 The email account does not exist", "request_id": "r1",
               "user_id": "user-r1", "kind": "hard"})
    );
    // A delivery notice is authentic and answered 200, with no effect.
    let answer = post_mailgun(
        &app,
        "token-0003",
        json!({"event": "delivered", "recipient": "dave@example.com"}),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json()["ignored"], 1);
    // Not JSON: 400 with a clear message.
    let answer = app.call(post("mailgun", "{not json", &[])).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert!(
        answer.json()["detail"]
            .as_str()
            .unwrap_or("")
            .starts_with("body: not JSON")
    );
    app.cleanup().await;
}

/// Mailgun's replay protection: a notification whose signature was made more
/// than 15 minutes ago (or claims a time as far ahead) is refused like a
/// forged one, though its HMAC holds, and counted as `unauthorized`; within
/// the window it is accepted.
#[tokio::test]
async fn a_mailgun_signature_more_than_15_minutes_old_is_refused_as_a_replay() {
    let sg = SendgridKey::new();
    let (app, _) = app(&sg, &[]).await;
    let event =
        json!({"event": "failed", "severity": "permanent", "recipient": "stale@example.com"});
    for (age, token) in [
        (16 * 60, "token-s1"),
        (-16 * 60, "token-s2"),
        (86_400, "token-s3"),
    ] {
        let body = mailgun_body_at(now() - age, token, event.clone(), MAILGUN_KEY);
        let answer = app.call(post("mailgun", &body, &[])).await;
        assert_eq!(
            answer.status,
            StatusCode::UNAUTHORIZED,
            "{age} s: {}",
            answer.body
        );
        assert_eq!(answer.json(), json!({"status": "unauthorized"}));
    }
    assert!(suppressions(&app).await.is_empty());
    assert!(app.outbox().await.is_empty());
    let metrics = app.ops_get("/metrics").await.body;
    let line = r#"verimail_gateway_webhook_notifications_total{provider="mailgun",result="unauthorized"} 3"#;
    assert!(
        metrics.lines().any(|l| l == line),
        "{line} missing from:\n{metrics}"
    );

    // Fourteen minutes old: within the window.
    let body = mailgun_body_at(now() - 14 * 60, "token-s4", event, MAILGUN_KEY);
    let answer = app.call(post("mailgun", &body, &[])).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(
        suppressions(&app).await,
        [(
            "stale@example.com".into(),
            "bounce".into(),
            "mailgun".into()
        )]
    );
    app.cleanup().await;
}
