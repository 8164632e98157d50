//! Legacy itsdangerous tokens (`ACCEPT_ITSDANGEROUS`): one made by Python
//! confirms, takes its ids and context from the latest mail to the address
//! (or nulls), and expires like any other.

use std::time::Duration;

use serde_json::json;
use time::OffsetDateTime;

use crate::common::*;
use crate::confirmations;

/// The first vector of shared/tests/vectors/itsdangerous.json (made by Python's itsdangerous).
const VECTOR_SECRET: &str = "correct horse battery staple";
const VECTOR_TOKEN: &str = "ImFsaWNlQGV4YW1wbGUuY29tIg.aSSBAA.BmRDExBJP8ylV0Oi6-akHMdAL90";

fn legacy_vars() -> [(&'static str, &'static str); 4] {
    [
        ("VERIMAIL_SECRET_KEY", VECTOR_SECRET),
        ("ACCEPT_ITSDANGEROUS", "true"),
        // The vector was signed on 2025-11-24: a TTL of ten years keeps it valid.
        ("TOKEN_TTL_SECONDS", "315360000"),
        ("RETENTION_HOURS", "100000"),
    ]
}

#[tokio::test]
async fn a_legacy_token_for_an_unknown_address_confirms_with_nulls() {
    let app = TestApp::new(&legacy_vars()).await;
    let answer = app.get_json(&format!("/confirm/{VECTOR_TOKEN}")).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        answer.json(),
        json!({"status": "verified", "user_id": null, "email": "alice@example.com"})
    );
    let outbox = app.outbox().await;
    assert_eq!(outbox.len(), 1);
    let data = &outbox[0].1["data"];
    assert_eq!(data["request_id"], serde_json::Value::Null);
    assert_eq!(data["user_id"], serde_json::Value::Null);
    assert_eq!(data["context"], serde_json::Value::Null);
    assert_eq!(data["email"], "alice@example.com");
    assert_eq!(data["purpose"], "verify_email");
    let keys = confirmations(&app).await;
    assert_eq!(keys[0].0, "e:alice@example.com");
    app.cleanup().await;
}

#[tokio::test]
async fn a_legacy_token_takes_ids_and_context_from_the_latest_mail() {
    let app = TestApp::new(&legacy_vars()).await;
    app.insert_request(
        "old",
        "alice@example.com",
        "verify_email",
        None,
        Some(json!({"n": 1})),
        Duration::from_secs(600),
    )
    .await;
    app.insert_request(
        "new",
        "alice@example.com",
        "verify_email",
        Some("https://app.example.com/hi"),
        Some(json!({"n": 2})),
        Duration::from_secs(60),
    )
    .await;
    app.insert_request(
        "other",
        "bob@example.com",
        "verify_email",
        None,
        None,
        Duration::ZERO,
    )
    .await;
    let answer = app.get(&format!("/confirm/{VECTOR_TOKEN}")).await;
    assert_eq!(answer.status, 303);
    assert_eq!(
        answer.header("location"),
        "https://app.example.com/hi?verimail=verified"
    );
    let outbox = app.outbox().await;
    let data = &outbox[0].1["data"];
    assert_eq!(data["request_id"], "new");
    assert_eq!(data["user_id"], "user-new");
    assert_eq!(data["context"], json!({"n": 2}));

    // A fresh legacy token for the same address is already verified.
    let fresh = app
        .state
        .signer()
        .mint_itsdangerous("alice@example.com", OffsetDateTime::now_utc());
    let again = app.get_json(&format!("/confirm/{fresh}")).await;
    assert_eq!(again.status, 303);
    assert_eq!(again.json()["status"], "already_verified");
    assert_eq!(again.json()["user_id"], "user-new");
    assert_eq!(app.outbox().await.len(), 1);
    app.cleanup().await;
}

#[tokio::test]
async fn an_expired_legacy_token_is_410() {
    let app = TestApp::new(&[
        ("VERIMAIL_SECRET_KEY", VECTOR_SECRET),
        ("ACCEPT_ITSDANGEROUS", "true"),
    ])
    .await;
    let answer = app.get(&format!("/confirm/{VECTOR_TOKEN}")).await;
    assert_eq!(answer.status, 410);
    app.cleanup().await;
}
