//! What every webhook room shares: a gateway state with every provider in
//! `WEBHOOK_SECRETS` and a fetcher that records what the gateway fetches, a
//! raw POST (for tampered and unsigned bodies), an API call, and the effects
//! to check (suppressions, outbox events).

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::Request;
use base64::Engine;
use futures_util::future::BoxFuture;
use serde_json::Value;
use verimail_gateway::webhooks::sns::Fetch;
use verimail_gateway::{AppState, BusSlot, connect_pool};

use crate::common::*;
use crate::mailgun::MAILGUN_KEY;
use crate::postmark::POSTMARK;
use crate::sendgrid::SendgridKey;
use crate::ses::TOPIC;

/// A key of `GATEWAY_API_KEYS`.
pub const KEY: &str = "gateway-test-api-key-01";

/// Standard base64, as the providers use it.
pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Records every URL the gateway fetches; answers `pem` for certificate URLs.
#[derive(Debug, Default)]
pub struct Watcher {
    fetched: Mutex<Vec<String>>,
    pub pem: Mutex<Option<String>>,
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
    pub fn fetched(&self) -> Vec<String> {
        self.fetched.lock().expect("lock").clone()
    }
}

/// A state with every webhook on and a watched fetcher.
pub async fn app(sendgrid: &SendgridKey, extra: &[(&str, &str)]) -> (TestApp, Arc<Watcher>) {
    let watcher = Arc::new(Watcher::default());
    (
        app_with_fetch(sendgrid, extra, watcher.clone()).await,
        watcher,
    )
}

/// A state with every webhook on, fetching SNS URLs through `fetch`.
pub async fn app_with_fetch(
    sendgrid: &SendgridKey,
    extra: &[(&str, &str)],
    fetch: Arc<dyn Fetch>,
) -> TestApp {
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
    let state = AppState::with_fetch(&config, pool, BusSlot::empty(), fetch).expect("configured");
    TestApp {
        state,
        config,
        db_name,
        namespace,
    }
}

/// A POST to `/v1/webhooks/{provider}` with `body` and `headers` exactly as
/// given: the raw request a tampered or unsigned notification needs.
pub fn post(provider: &str, body: &str, headers: &[(String, String)]) -> Request<Body> {
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

/// (email, reason, source) of every entry.
pub async fn suppressions(app: &TestApp) -> Vec<(String, String, String)> {
    sqlx::query_as("SELECT email, reason, source FROM suppressions ORDER BY email")
        .fetch_all(app.pool())
        .await
        .expect("read suppressions")
}

/// `data` of every outbox event of `ty`.
pub async fn events(app: &TestApp, ty: &str) -> Vec<Value> {
    app.outbox()
        .await
        .into_iter()
        .filter(|(_, e)| e["type"] == ty)
        .map(|(_, e)| e["data"].clone())
        .collect()
}

/// A call of the gateway's `/v1/` API, with `key` as the bearer key.
pub fn api(method: &str, path: &str, key: Option<&str>, body: &str) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(path);
    if let Some(key) = key {
        builder = builder.header("Authorization", format!("Bearer {key}"));
    }
    builder
        .body(Body::from(body.to_owned()))
        .expect("a request")
}

/// A request `id` whose verification mail to `email` went through a
/// provider that answered `provider_id` (as the worker records it at send
/// time, in `provider_messages`): bounce notifications name the mail by that id.
pub async fn sent_through_provider(app: &TestApp, id: &str, email: &str, provider_id: &str) {
    insert_sent_request(app, id, email).await;
    sqlx::query("INSERT INTO provider_messages (provider_message_id, request_id) VALUES ($1, $2)")
        .bind(provider_id)
        .bind(id)
        .execute(app.pool())
        .await
        .expect("record the provider's id");
}

/// [`sent_through_provider`] as a worker of the release before
/// `provider_messages` recorded it: in `requests.provider_message_id`.
pub async fn sent_through_provider_by_an_earlier_release(
    app: &TestApp,
    id: &str,
    email: &str,
    provider_id: &str,
) {
    insert_sent_request(app, id, email).await;
    sqlx::query("UPDATE requests SET provider_message_id = $1 WHERE id = $2")
        .bind(provider_id)
        .bind(id)
        .execute(app.pool())
        .await
        .expect("record the provider's id");
}

async fn insert_sent_request(app: &TestApp, id: &str, email: &str) {
    app.insert_request(
        id,
        email,
        "verify_email",
        None,
        None,
        std::time::Duration::ZERO,
    )
    .await;
}
