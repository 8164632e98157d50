//! SendGrid's Signed Event Webhook: ECDSA P-256 with SHA-256 over the
//! timestamp header followed by the exact body, with the public key its
//! dashboard shows.

use axum::http::StatusCode;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};

use crate::common::*;
use crate::support::{app, b64, events, post, sent_through_provider, suppressions};

/// A P-256 key pair and its public key as SendGrid's dashboard shows it.
pub struct SendgridKey {
    pair: EcdsaKeyPair,
    pub public_b64: String,
}

impl SendgridKey {
    pub fn new() -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .expect("generate a P-256 key");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
            .expect("read it back");
        let spki = [
            &verimail_shared::config::webhooks::P256_SPKI_PREFIX[..],
            pair.public_key().as_ref(),
        ]
        .concat();
        Self {
            public_b64: b64(&spki),
            pair,
        }
    }

    /// The two headers SendGrid sends with `body`.
    pub fn sign(&self, timestamp: &str, body: &str) -> [(String, String); 2] {
        let signed = [timestamp.as_bytes(), body.as_bytes()].concat();
        let sig = self.pair.sign(&SystemRandom::new(), &signed).expect("sign");
        [
            (
                "X-Twilio-Email-Event-Webhook-Signature".into(),
                b64(sig.as_ref()),
            ),
            (
                "X-Twilio-Email-Event-Webhook-Timestamp".into(),
                timestamp.into(),
            ),
        ]
    }
}

/// Signs `body` with `key` as of `timestamp`, as SendGrid does, and POSTs it.
pub async fn post_sendgrid(
    app: &TestApp,
    key: &SendgridKey,
    timestamp: &str,
    body: &str,
) -> Answer {
    app.call(post("sendgrid", body, &key.sign(timestamp, body)))
        .await
}

#[tokio::test]
async fn sendgrid_batches_are_verified_with_the_configured_p256_key() {
    let sg = SendgridKey::new();
    let (app, _) = app(&sg, &[]).await;
    sent_through_provider(&app, "r2", "erin@example.com", "LRzXl_NHStOGhQ4kofSm_A").await;
    let body = json!([
        {"email": "erin@example.com", "event": "bounce", "type": "bounce", "status": "5.1.1",
         "reason": "550 5.1.1 no such user", "sg_event_id": "sg-1",
         "sg_message_id": "LRzXl_NHStOGhQ4kofSm_A.filterdrecv-1", "timestamp": 1764950400},
        {"email": "frank@example.com", "event": "bounce", "type": "blocked",
         "reason": "550 blocked by policy", "sg_event_id": "sg-2", "timestamp": 1764950400},
        {"email": "gina@example.com", "event": "spamreport", "sg_event_id": "sg-3", "timestamp": 1764950400},
        {"email": "hank@example.com", "event": "delivered", "sg_event_id": "sg-4", "timestamp": 1764950400}
    ])
    .to_string()
        + "\r\n";
    let headers = sg.sign("1764950401", &body);

    let tampered = body.replace("spamreport", "open");
    let answer = app.call(post("sendgrid", &tampered, &headers)).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    let answer = app.call(post("sendgrid", &body, &[])).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "unsigned");
    let answer = post_sendgrid(&app, &SendgridKey::new(), "1764950401", &body).await;
    assert_eq!(
        answer.status,
        StatusCode::UNAUTHORIZED,
        "signed with another key"
    );
    assert!(suppressions(&app).await.is_empty());
    assert!(app.outbox().await.is_empty());

    let answer = post_sendgrid(&app, &sg, "1764950401", &body).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(
        answer.json(),
        json!({"status": "ok", "acted": 3, "duplicates": 0, "ignored": 1})
    );
    let answer = post_sendgrid(&app, &sg, "1764950401", &body).await;
    assert_eq!(
        answer.json(),
        json!({"status": "ok", "acted": 0, "duplicates": 3, "ignored": 1})
    );
    // The soft bounce (a block) is published but never suppresses.
    assert_eq!(
        suppressions(&app).await,
        [
            (
                "erin@example.com".into(),
                "bounce".into(),
                "sendgrid".into()
            ),
            (
                "gina@example.com".into(),
                "complaint".into(),
                "sendgrid".into()
            ),
        ]
    );
    let bounced = events(&app, "verimail.email.bounced").await;
    assert_eq!(bounced.len(), 2);
    let erin = bounced
        .iter()
        .find(|e| e["email"] == "erin@example.com")
        .expect("erin");
    assert_eq!(
        (erin["kind"].as_str(), erin["request_id"].as_str()),
        (Some("hard"), Some("r2"))
    );
    let frank = bounced
        .iter()
        .find(|e| e["email"] == "frank@example.com")
        .expect("frank");
    assert_eq!(
        (frank["kind"].as_str(), frank["request_id"].clone()),
        (Some("soft"), Value::Null)
    );
    let complained = events(&app, "verimail.email.complained").await;
    assert_eq!(complained.len(), 1);
    assert_eq!(complained[0]["email"], "gina@example.com");
    assert_eq!(complained[0]["provider"], "sendgrid");

    // Signed but not JSON: 400.
    let answer = post_sendgrid(&app, &sg, "1764950402", "oops").await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    app.cleanup().await;
}
