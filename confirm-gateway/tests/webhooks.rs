//! `/v1/webhooks/{provider}` and `/v1/suppressions` through the router, on a
//! real database: each provider's notification signed the way the provider
//! documents it, with keys made here (an ECDSA P-256 key for SendGrid, an RSA
//! certificate made with `openssl` for SNS, put in the certificate cache as a
//! fetched one would be); tampered and unsigned ones answer 401 and change
//! nothing; a notification delivered twice has one effect; the events reach
//! the bus.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine;
use common::*;
use futures_util::future::BoxFuture;
use hmac::{Hmac, Mac};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};
use sha2::Sha256;
use verimail_gateway::webhooks::sns::Fetch;
use verimail_gateway::{AppState, BusSlot, connect_pool};

const KEY: &str = "gateway-test-api-key-01";
const MAILGUN_KEY: &str = "key-mailgun-signing-0123456789";
const POSTMARK: &str = "hooks:s3cret-pass";
const CERT_URL: &str = "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-test.pem";
const TOPIC: &str = "arn:aws:sns:us-east-1:123456789012:ses-bounces";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A P-256 key pair and its public key as SendGrid's dashboard shows it.
struct SendgridKey {
    pair: EcdsaKeyPair,
    public_b64: String,
}

impl SendgridKey {
    fn new() -> Self {
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
    fn sign(&self, timestamp: &str, body: &str) -> [(String, String); 2] {
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

/// An RSA key and self-signed certificate made with `openssl`, standing in
/// for Amazon's SNS signing certificate.
struct SnsCert {
    dir: PathBuf,
    pem: String,
}

impl SnsCert {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("sns-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let status = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=sns.amazonaws.com",
                "-keyout",
            ])
            .arg(dir.join("key.pem"))
            .arg("-out")
            .arg(dir.join("cert.pem"))
            .output()
            .expect("openssl is installed (the SNS tests need it)");
        assert!(
            status.status.success(),
            "{}",
            String::from_utf8_lossy(&status.stderr)
        );
        let pem = std::fs::read_to_string(dir.join("cert.pem")).expect("the certificate");
        Self { dir, pem }
    }

    /// Base64 RSA PKCS#1 v1.5 signature of `text` with SHA-1 (`"1"`) or SHA-256 (`"2"`).
    fn sign(&self, version: &str, text: &str) -> String {
        use std::io::Write;
        let digest = if version == "1" { "-sha1" } else { "-sha256" };
        let mut child = Command::new("openssl")
            .args(["dgst", digest, "-sign"])
            .arg(self.dir.join("key.pem"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("openssl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write");
        let out = child.wait_with_output().expect("openssl signs");
        assert!(out.status.success());
        b64(&out.stdout)
    }

    /// A signed SNS message: `fields` plus the signature fields.
    fn message(&self, version: &str, cert_url: &str, fields: Value) -> Value {
        let mut message = fields;
        let map = message.as_object().expect("an object").clone();
        let text =
            verimail_gateway::webhooks::sns::string_to_sign(&map).expect("all signed fields");
        message["SignatureVersion"] = json!(version);
        message["Signature"] = json!(self.sign(version, &text));
        message["SigningCertURL"] = json!(cert_url);
        message
    }
}

impl Drop for SnsCert {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Records every URL the gateway fetches; answers `pem` for certificate URLs.
#[derive(Debug, Default)]
struct Watcher {
    fetched: Mutex<Vec<String>>,
    pem: Mutex<Option<String>>,
}

impl Fetch for Watcher {
    fn get(&self, url: url::Url) -> BoxFuture<'_, Result<Vec<u8>, String>> {
        Box::pin(async move {
            self.fetched.lock().expect("lock").push(url.to_string());
            if url.path().ends_with(".pem") {
                return self
                    .pem
                    .lock()
                    .expect("lock")
                    .clone()
                    .map(String::into_bytes)
                    .ok_or_else(|| "no such certificate".to_owned());
            }
            Ok(b"<ConfirmSubscriptionResponse/>".to_vec())
        })
    }
}

impl Watcher {
    fn fetched(&self) -> Vec<String> {
        self.fetched.lock().expect("lock").clone()
    }
}

/// A state with every webhook on and a watched fetcher.
async fn app(sendgrid: &SendgridKey, extra: &[(&str, &str)]) -> (TestApp, Arc<Watcher>) {
    let secrets = format!(
        "mailgun={MAILGUN_KEY},sendgrid={},postmark={POSTMARK},ses={TOPIC}",
        sendgrid.public_b64
    );
    let mut vars = vec![
        ("WEBHOOK_SECRETS", secrets.as_str()),
        ("GATEWAY_API_KEYS", KEY),
    ];
    vars.extend_from_slice(extra);
    let (config, db_name, namespace) = config(&vars);
    let pool = connect_pool(&config).await.expect("test database");
    let watcher = Arc::new(Watcher::default());
    let state =
        AppState::with_fetch(&config, pool, BusSlot::empty(), watcher.clone()).expect("configured");
    (
        TestApp {
            state,
            config,
            db_name,
            namespace,
        },
        watcher,
    )
}

fn post(provider: &str, body: &str, headers: &[(String, String)]) -> Request<Body> {
    let mut builder = Request::builder()
        .method("POST")
        .uri(format!("/v1/webhooks/{provider}"))
        .header("Content-Type", "application/json");
    for (k, v) in headers {
        builder = builder.header(k.as_str(), v.as_str());
    }
    builder
        .body(Body::from(body.to_owned()))
        .expect("a request")
}

fn mailgun_body(token: &str, event: Value, key: &str) -> String {
    let timestamp = "1764950400";
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

/// (email, reason, source) of every entry.
async fn suppressions(app: &TestApp) -> Vec<(String, String, String)> {
    sqlx::query_as("SELECT email, reason, source FROM suppressions ORDER BY email")
        .fetch_all(app.pool())
        .await
        .expect("read suppressions")
}

/// `data` of every outbox event of `ty`.
async fn events(app: &TestApp, ty: &str) -> Vec<Value> {
    app.outbox()
        .await
        .into_iter()
        .filter(|(_, e)| e["type"] == ty)
        .map(|(_, e)| e["data"].clone())
        .collect()
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
    let delivered = mailgun_body(
        "token-0003",
        json!({"event": "delivered", "recipient": "dave@example.com"}),
        MAILGUN_KEY,
    );
    let answer = app.call(post("mailgun", &delivered, &[])).await;
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

#[tokio::test]
async fn sendgrid_batches_are_verified_with_the_configured_p256_key() {
    let sg = SendgridKey::new();
    let (app, _) = app(&sg, &[]).await;
    app.insert_request(
        "r2",
        "erin@example.com",
        "verify_email",
        None,
        None,
        Duration::ZERO,
    )
    .await;
    sqlx::query(
        "UPDATE requests SET provider_message_id = 'LRzXl_NHStOGhQ4kofSm_A' WHERE id = 'r2'",
    )
    .execute(app.pool())
    .await
    .expect("record the provider's id");
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
    let other = SendgridKey::new().sign("1764950401", &body);
    let answer = app.call(post("sendgrid", &body, &other)).await;
    assert_eq!(
        answer.status,
        StatusCode::UNAUTHORIZED,
        "signed with another key"
    );
    assert!(suppressions(&app).await.is_empty());
    assert!(app.outbox().await.is_empty());

    let answer = app.call(post("sendgrid", &body, &headers)).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(
        answer.json(),
        json!({"status": "ok", "acted": 3, "duplicates": 0, "ignored": 1})
    );
    let answer = app.call(post("sendgrid", &body, &headers)).await;
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
    let headers = sg.sign("1764950402", "oops");
    let answer = app.call(post("sendgrid", "oops", &headers)).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    app.cleanup().await;
}

#[tokio::test]
async fn postmark_needs_its_basic_auth_and_ties_a_bounce_by_its_message_id() {
    let sg = SendgridKey::new();
    let (app, _) = app(&sg, &[]).await;
    app.insert_request(
        "r3",
        "ivy@example.com",
        "verify_email",
        None,
        None,
        Duration::ZERO,
    )
    .await;
    sqlx::query("UPDATE requests SET provider_message_id = '883953f4-6105-42a2-a16a-77a8eac79483' WHERE id = 'r3'")
        .execute(app.pool())
        .await
        .expect("record the provider's id");
    // Postmark's documented HardBounce sample, our address and id in it.
    let bounce = json!({"RecordType": "Bounce", "MessageStream": "outbound", "ID": 4323372036854775807_u64,
        "Type": "HardBounce", "TypeCode": 1, "Name": "Hard bounce", "Tag": "Test",
        "MessageID": "883953f4-6105-42a2-a16a-77a8eac79483", "ServerID": 23,
        "Description": "The server was unable to deliver your message (ex: unknown user, mailbox not found).",
        "Details": "smtp;550 5.1.1 The email account that you tried to reach does not exist.",
        "Email": "ivy@example.com", "From": "no-reply@example.com", "BouncedAt": "2026-12-05T10:00:00.1234567-05:00",
        "DumpAvailable": true, "Inactive": true, "CanActivate": true, "Subject": "Confirm"})
    .to_string();
    let auth = |creds: &str| {
        [(
            "Authorization".to_owned(),
            format!("Basic {}", b64(creds.as_bytes())),
        )]
    };
    for bad in [
        auth("hooks:wrong"),
        auth("other:s3cret-pass"),
        auth("hooks"),
    ] {
        let answer = app.call(post("postmark", &bounce, &bad)).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    }
    let answer = app.call(post("postmark", &bounce, &[])).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert!(suppressions(&app).await.is_empty());

    let good = auth(POSTMARK);
    for _ in 0..2 {
        let answer = app.call(post("postmark", &bounce, &good)).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    }
    let bounced = events(&app, "verimail.email.bounced").await;
    assert_eq!(bounced.len(), 1);
    assert_eq!(bounced[0]["request_id"], "r3");
    assert_eq!(bounced[0]["user_id"], "user-r3");
    assert_eq!(bounced[0]["occurred_at"], "2026-12-05T15:00:00.1234567Z");
    let complaint = json!({"RecordType": "SpamComplaint", "ID": 42, "Type": "SpamComplaint",
        "TypeCode": 512, "Email": "jack@example.com", "BouncedAt": "2026-12-05T10:00:00Z",
        "Details": "Test spam complaint details", "MessageID": "00000000-0000-0000-0000-000000000000"})
    .to_string();
    let answer = app.call(post("postmark", &complaint, &good)).await;
    assert_eq!(answer.status, StatusCode::OK);
    let delivery =
        json!({"RecordType": "Delivery", "ID": 43, "Recipient": "ivy@example.com"}).to_string();
    let answer = app.call(post("postmark", &delivery, &good)).await;
    assert_eq!(answer.json()["ignored"], 1);
    assert_eq!(
        suppressions(&app).await,
        [
            ("ivy@example.com".into(), "bounce".into(), "postmark".into()),
            (
                "jack@example.com".into(),
                "complaint".into(),
                "postmark".into()
            ),
        ]
    );
    app.cleanup().await;
}

fn ses_bounce(sns_id: &str, recipients: &[&str], bounce_type: &str) -> Value {
    let message = json!({"notificationType": "Bounce",
        "bounce": {"bounceType": bounce_type, "bounceSubType": "General",
            "bouncedRecipients": recipients.iter().map(|r| json!({"emailAddress": r, "action": "failed",
                "status": "5.1.1", "diagnosticCode": "smtp; 550 5.1.1 user unknown"})).collect::<Vec<_>>(),
            "timestamp": "2026-12-05T10:00:01.000Z", "feedbackId": "0100-feedback"},
        "mail": {"timestamp": "2026-12-05T10:00:00.000Z", "source": "no-reply@example.com",
            "messageId": "0100018c-ses-id-000000", "destination": recipients}});
    json!({"Type": "Notification", "MessageId": sns_id, "TopicArn": TOPIC,
        "Message": message.to_string(), "Timestamp": "2026-12-05T10:00:02.000Z",
        "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe&SubscriptionArn=x"})
}

#[tokio::test]
async fn ses_notifications_are_verified_with_the_sns_certificate_version_1_and_2() {
    let sg = SendgridKey::new();
    let (app, watcher) = app(&sg, &[]).await;
    let cert = SnsCert::new();
    // The certificate as a fetch would have stored it.
    sqlx::query("INSERT INTO sns_certificates (url, pem) VALUES ($1, $2)")
        .bind(CERT_URL)
        .bind(&cert.pem)
        .execute(app.pool())
        .await
        .expect("cache the certificate");
    app.insert_request(
        "r4",
        "kim@example.com",
        "verify_email",
        None,
        None,
        Duration::ZERO,
    )
    .await;
    sqlx::query(
        "UPDATE requests SET provider_message_id = '0100018c-ses-id-000000' WHERE id = 'r4'",
    )
    .execute(app.pool())
    .await
    .expect("record the provider's id");
    let sns_headers = [(
        "x-amz-sns-message-type".to_owned(),
        "Notification".to_owned(),
    )];

    let v1 = cert.message(
        "1",
        CERT_URL,
        ses_bounce(
            "sns-1",
            &["kim@example.com", "Lee@example.com"],
            "Permanent",
        ),
    );
    let v2 = cert.message(
        "2",
        CERT_URL,
        ses_bounce("sns-2", &["max@example.com"], "Transient"),
    );
    // Tampered, a wrong version, a certificate from elsewhere, unsigned: 401.
    let mut tampered = v1.clone();
    tampered["Message"] = json!(
        tampered["Message"]
            .as_str()
            .unwrap_or("")
            .replace("kim@", "kym@")
    );
    let mut wrong_version = v1.clone();
    wrong_version["SignatureVersion"] = json!("2");
    let mut elsewhere = v1.clone();
    elsewhere["SigningCertURL"] =
        json!("https://evil.example.com/SimpleNotificationService-test.pem");
    let mut unsigned = v1.clone();
    unsigned.as_object_mut().map(|m| m.remove("Signature"));
    for bad in [&tampered, &wrong_version, &elsewhere, &unsigned] {
        let answer = app.call(post("ses", &bad.to_string(), &sns_headers)).await;
        assert_eq!(
            answer.status,
            StatusCode::UNAUTHORIZED,
            "{bad}: {}",
            answer.body
        );
    }
    // Signed right, but from a topic not in WEBHOOK_SECRETS.
    let mut other_topic = ses_bounce("sns-9", &["kim@example.com"], "Permanent");
    other_topic["TopicArn"] = json!("arn:aws:sns:us-east-1:123456789012:someone-else");
    let other_topic = cert.message("2", CERT_URL, other_topic);
    let answer = app
        .call(post("ses", &other_topic.to_string(), &sns_headers))
        .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert!(suppressions(&app).await.is_empty());
    assert!(app.outbox().await.is_empty());
    assert!(
        watcher.fetched().is_empty(),
        "nothing fetched from elsewhere: {:?}",
        watcher.fetched()
    );

    for _ in 0..2 {
        let answer = app.call(post("ses", &v1.to_string(), &sns_headers)).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    }
    let answer = app.call(post("ses", &v2.to_string(), &sns_headers)).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(
        suppressions(&app).await,
        [
            ("Lee@example.com".into(), "bounce".into(), "ses".into()),
            ("kim@example.com".into(), "bounce".into(), "ses".into()),
        ]
    );
    let bounced = events(&app, "verimail.email.bounced").await;
    assert_eq!(bounced.len(), 3, "{bounced:?}");
    let kim = bounced
        .iter()
        .find(|e| e["email"] == "kim@example.com")
        .expect("kim");
    assert_eq!(kim["request_id"], "r4");
    assert_eq!(kim["detail"], "smtp; 550 5.1.1 user unknown");
    let max = bounced
        .iter()
        .find(|e| e["email"] == "max@example.com")
        .expect("max");
    assert_eq!(max["kind"], "soft");
    assert!(
        watcher.fetched().is_empty(),
        "the cached certificate was used"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn an_sns_subscription_is_confirmed_and_an_unknown_certificate_fetched_from_sns_only() {
    let sg = SendgridKey::new();
    let (app, watcher) = app(&sg, &[]).await;
    let cert = SnsCert::new();
    *watcher.pem.lock().expect("lock") = Some(cert.pem.clone());
    let subscribe = "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription&TopicArn=x&Token=2336412f37";
    let confirmation = cert.message(
        "1",
        CERT_URL,
        json!({"Type": "SubscriptionConfirmation", "MessageId": "165545c9-2a5c-472c-8df2-7ff2be2b3b1b",
               "Token": "2336412f37", "TopicArn": TOPIC,
               "Message": "You have chosen to subscribe to the topic. To confirm the subscription, visit the SubscribeURL included in this message.",
               "SubscribeURL": subscribe, "Timestamp": "2026-12-05T10:00:00.000Z"}),
    );
    let answer = app
        .call(post(
            "ses",
            &confirmation.to_string(),
            &[(
                "x-amz-sns-message-type".into(),
                "SubscriptionConfirmation".into(),
            )],
        ))
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(answer.json()["status"], "subscription_confirmed");
    assert_eq!(watcher.fetched(), [CERT_URL, subscribe]);
    // The fetched certificate is cached for every gateway.
    let stored: Option<String> =
        sqlx::query_scalar("SELECT pem FROM sns_certificates WHERE url = $1")
            .bind(CERT_URL)
            .fetch_optional(app.pool())
            .await
            .expect("read the cache");
    assert_eq!(stored.as_deref(), Some(cert.pem.as_str()));

    // A confirmation that points anywhere but SNS is not followed.
    let mut evil = confirmation.clone();
    evil["SubscribeURL"] = json!("https://evil.example.com/?Action=ConfirmSubscription");
    let evil = cert.message("1", CERT_URL, {
        let mut e = evil;
        for k in ["Signature", "SignatureVersion", "SigningCertURL"] {
            e.as_object_mut().map(|m| m.remove(k));
        }
        e
    });
    let answer = app.call(post("ses", &evil.to_string(), &[])).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(watcher.fetched().len(), 2, "{:?}", watcher.fetched());
    app.cleanup().await;
}

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

fn api(method: &str, path: &str, key: Option<&str>, body: &str) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(path);
    if let Some(key) = key {
        builder = builder.header("Authorization", format!("Bearer {key}"));
    }
    builder
        .body(Body::from(body.to_owned()))
        .expect("a request")
}

#[tokio::test]
async fn the_suppression_api_puts_finds_and_deletes_an_address_in_any_case() {
    let app = TestApp::new(&[("GATEWAY_API_KEYS", KEY)]).await;
    let get = |email: &str| {
        api(
            "GET",
            &format!("/v1/suppressions?email={email}"),
            Some(KEY),
            "",
        )
    };
    let answer = app.call(get("nora%40example.com")).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);

    let answer = app
        .call(api(
            "PUT",
            "/v1/suppressions/Nora@Example.com",
            Some(KEY),
            r#"{"reason":"manual"}"#,
        ))
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    let entry = answer.json();
    assert_eq!(
        (&entry["email"], &entry["reason"], &entry["source"]),
        (&json!("Nora@Example.com"), &json!("manual"), &json!("api"))
    );
    assert!(
        entry["created_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    let answer = app.call(get("nora%40example.com")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json()["email"], "Nora@Example.com");
    // A second PUT (another case, another reason) keeps the one entry.
    let answer = app
        .call(api(
            "PUT",
            "/v1/suppressions/NORA@example.com",
            Some(KEY),
            r#"{"reason":"complaint"}"#,
        ))
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json()["reason"], "manual");
    for (body, detail) in [
        (r#"{"reason":"spam"}"#, "reason: unknown reason"),
        ("nope", "body: not JSON"),
        (r#"{"raeson":"manual"}"#, "unknown field"),
    ] {
        let answer = app
            .call(api(
                "PUT",
                "/v1/suppressions/o@example.com",
                Some(KEY),
                body,
            ))
            .await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{body}");
        assert!(
            answer.json()["detail"]
                .as_str()
                .unwrap_or("")
                .starts_with(detail),
            "{}",
            answer.body
        );
    }
    let answer = app
        .call(api("PUT", "/v1/suppressions/not-an-address", Some(KEY), ""))
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    for key in [None, Some("wrong-key-0123456789")] {
        for req in [
            api("GET", "/v1/suppressions?email=nora%40example.com", key, ""),
            api("PUT", "/v1/suppressions/x@example.com", key, ""),
            api("DELETE", "/v1/suppressions/nora@example.com", key, ""),
        ] {
            let answer = app.call(req).await;
            assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
        }
    }
    let answer = app
        .call(api(
            "DELETE",
            "/v1/suppressions/nora@EXAMPLE.com",
            Some(KEY),
            "",
        ))
        .await;
    assert_eq!(answer.status, StatusCode::NO_CONTENT);
    let answer = app
        .call(api(
            "DELETE",
            "/v1/suppressions/nora@example.com",
            Some(KEY),
            "",
        ))
        .await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    let answer = app.call(get("nora%40example.com")).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
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
    use lapin::options::{
        BasicGetOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    };
    use lapin::types::FieldTable;
    use verimail_shared::bus::{Bus, Topology};
    use verimail_shared::events::Event;

    let sg = SendgridKey::new();
    let (probe, _) = app(&sg, &[]).await;
    let namespace = probe.namespace.clone();
    let bus = Bus::connect_once(
        &[verimail_shared::config::defaults::AMQP_URL.to_owned()],
        "gateway-webhook-test",
    )
    .await
    .expect("RabbitMQ runs locally");
    let channel = bus.channel().await.expect("a channel");
    let topology = Topology::new(&namespace);
    verimail_shared::bus::declare_exchange(&channel, &topology)
        .await
        .expect("declare the exchange");
    let queue = topology.subscriber_queue("deliverability");
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare");
    channel
        .queue_bind(
            queue.as_str().into(),
            topology.exchange().into(),
            "verimail.email.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    // The same database and namespace, now with the broker.
    let state = AppState::with_fetch(
        &probe.config,
        probe.pool().clone(),
        BusSlot::with(bus.clone()),
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
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while got.len() < 2 && tokio::time::Instant::now() < deadline {
        match channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
        {
            Some(m) => got.push(m.delivery),
            None => tokio::time::sleep(Duration::from_millis(50)).await,
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
    let _ = channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = channel
        .exchange_delete(
            topology.exchange().into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await;
    bus.close().await;
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
    let basic = vec![(
        "Authorization".to_owned(),
        format!("Basic {}", b64(POSTMARK.as_bytes())),
    )];
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
