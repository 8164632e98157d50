//! Amazon SES through SNS: the SNS envelope signed (versions 1 and 2) with
//! the certificate named by `SigningCertURL`, fetched only from SNS and
//! cached; subscriptions are confirmed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use futures_util::future::{BoxFuture, join_all};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use verimail_gateway::webhooks::sns::Fetch;

use crate::common::*;
use crate::sendgrid::SendgridKey;
use crate::support::{app, app_with_fetch, b64, events, post, sent_through_provider, suppressions};

/// The certificate URL the signed messages name.
pub const CERT_URL: &str = "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-test.pem";
/// The topic in `WEBHOOK_SECRETS`.
pub const TOPIC: &str = "arn:aws:sns:us-east-1:123456789012:ses-bounces";

/// An RSA key and self-signed certificate made with `openssl`, standing in
/// for Amazon's SNS signing certificate.
pub struct SnsCert {
    dir: PathBuf,
    pub pem: String,
}

impl SnsCert {
    pub fn new() -> Self {
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
    pub fn sign(&self, version: &str, text: &str) -> String {
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
    pub fn message(&self, version: &str, cert_url: &str, fields: Value) -> Value {
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

/// Signs `fields` with `cert` (SNS `version` 1 or 2, naming [`CERT_URL`]) as
/// SNS does, and POSTs them with SNS's message type header.
pub async fn post_sns(app: &TestApp, cert: &SnsCert, version: &str, fields: Value) -> Answer {
    post_sns_naming(app, cert, version, CERT_URL, fields).await
}

/// [`post_sns`], the message naming `cert_url` as its `SigningCertURL`.
pub async fn post_sns_naming(
    app: &TestApp,
    cert: &SnsCert,
    version: &str,
    cert_url: &str,
    fields: Value,
) -> Answer {
    let message = cert.message(version, cert_url, fields);
    let ty = message["Type"].as_str().unwrap_or_default().to_owned();
    app.call(post(
        "ses",
        &message.to_string(),
        &[("x-amz-sns-message-type".to_owned(), ty)],
    ))
    .await
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
    sent_through_provider(&app, "r4", "kim@example.com", "0100018c-ses-id-000000").await;
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
    let answer = post_sns(&app, &cert, "2", other_topic).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert!(suppressions(&app).await.is_empty());
    assert!(app.outbox().await.is_empty());
    assert!(
        watcher.fetched().is_empty(),
        "nothing fetched from elsewhere: {:?}",
        watcher.fetched()
    );

    // The same signed notification, delivered twice.
    for _ in 0..2 {
        let answer = app.call(post("ses", &v1.to_string(), &sns_headers)).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    }
    let v2 = ses_bounce("sns-2", &["max@example.com"], "Transient");
    let answer = post_sns(&app, &cert, "2", v2).await;
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
    let confirmation = json!({"Type": "SubscriptionConfirmation", "MessageId": "165545c9-2a5c-472c-8df2-7ff2be2b3b1b",
           "Token": "2336412f37", "TopicArn": TOPIC,
           "Message": "You have chosen to subscribe to the topic. To confirm the subscription, visit the SubscribeURL included in this message.",
           "SubscribeURL": subscribe, "Timestamp": "2026-12-05T10:00:00.000Z"});
    let answer = post_sns(&app, &cert, "1", confirmation.clone()).await;
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
    let mut evil = confirmation;
    evil["SubscribeURL"] = json!("https://evil.example.com/?Action=ConfirmSubscription");
    let answer = post_sns(&app, &cert, "1", evil).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(watcher.fetched().len(), 2, "{:?}", watcher.fetched());
    app.cleanup().await;
}

/// A local HTTP server standing in for SNS's certificate host, counting the
/// GETs of each path: `/garbage.pem` answers 200 with a body that is no
/// certificate, `/slow.pem` a 500 after a second, any other path a 500.
struct CertHost {
    addr: SocketAddr,
    hits: Arc<Mutex<HashMap<String, usize>>>,
}

impl CertHost {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind port 0");
        let addr = listener.local_addr().expect("an address");
        let hits: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let counted = hits.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(answer_one(socket, counted.clone()));
            }
        });
        Self { addr, hits }
    }

    /// How many GETs of `path` arrived.
    fn hits(&self, path: &str) -> usize {
        self.hits
            .lock()
            .expect("lock")
            .get(path)
            .copied()
            .unwrap_or(0)
    }
}

/// Reads one request's head, counts its path, answers and closes.
async fn answer_one(mut socket: tokio::net::TcpStream, hits: Arc<Mutex<HashMap<String, usize>>>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&head);
    let path = text.split_whitespace().nth(1).unwrap_or("").to_owned();
    *hits.lock().expect("lock").entry(path.clone()).or_default() += 1;
    if path == "/slow.pem" {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let (status, body) = if path == "/garbage.pem" {
        ("200 OK", "not a certificate")
    } else {
        ("500 Internal Server Error", "down")
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = socket.write_all(response.as_bytes()).await;
    let _ = socket.shutdown().await;
}

/// The gateway's fetcher pointed at a [`CertHost`]: an SNS URL (one that
/// passed the gateway's host rule) is fetched from the local host, same path.
#[derive(Debug)]
struct ToCertHost(SocketAddr);

impl Fetch for ToCertHost {
    fn get(&self, url: url::Url) -> BoxFuture<'_, Result<Vec<u8>, String>> {
        Box::pin(async move {
            let local = format!("http://{}{}", self.0, url.path());
            let (status, _, body) = verimail_tests::http::request("GET", &local, &[])
                .await
                .map_err(|e| format!("GET {local}: {e}"))?;
            if !(200..300).contains(&status) {
                return Err(format!("GET {local}: {status}"));
            }
            Ok(body.into_bytes())
        })
    }
}

/// A certificate URL whose fetch failed, or whose answer is no certificate,
/// is not fetched again within the minute, and notifications arriving while
/// a slow URL is fetched share that fetch: a flood of forged notifications
/// naming such a URL costs one outbound fetch, not one each. They answer 503
/// (SNS retries a real one) and change nothing.
#[tokio::test]
async fn a_certificate_url_that_failed_is_not_fetched_again_within_the_minute() {
    let host = CertHost::start().await;
    let sg = SendgridKey::new();
    let app = app_with_fetch(&sg, &[], Arc::new(ToCertHost(host.addr))).await;
    let cert = SnsCert::new();
    for path in ["/broken.pem", "/garbage.pem"] {
        let url = format!("https://sns.us-east-1.amazonaws.com{path}");
        for i in 0..3 {
            let fields = ses_bounce(&format!("neg{path}-{i}"), &["nia@example.com"], "Permanent");
            let answer = post_sns_naming(&app, &cert, "2", &url, fields).await;
            assert_eq!(
                answer.status,
                StatusCode::SERVICE_UNAVAILABLE,
                "{path}: {}",
                answer.body
            );
        }
        assert_eq!(
            host.hits(path),
            1,
            "{path}: one fetch for three notifications"
        );
    }

    // Signed first, then posted all at once.
    let slow = "https://sns.us-east-1.amazonaws.com/slow.pem";
    let messages: Vec<String> = (0..8)
        .map(|i| {
            let fields = ses_bounce(&format!("slow-{i}"), &["nia@example.com"], "Permanent");
            cert.message("2", slow, fields).to_string()
        })
        .collect();
    let header = [(
        "x-amz-sns-message-type".to_owned(),
        "Notification".to_owned(),
    )];
    let answers = join_all(messages.iter().map(|m| app.call(post("ses", m, &header)))).await;
    for answer in &answers {
        assert_eq!(
            answer.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            answer.body
        );
    }
    assert_eq!(host.hits("/slow.pem"), 1, "eight notifications, one fetch");

    assert!(suppressions(&app).await.is_empty());
    assert!(app.outbox().await.is_empty());
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM sns_certificates")
        .fetch_one(app.pool())
        .await
        .expect("read the table");
    assert_eq!(stored, 0, "nothing unusable is shared with other gateways");
    app.cleanup().await;
}
