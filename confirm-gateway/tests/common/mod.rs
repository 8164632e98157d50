//! Helpers shared by the gateway's test binaries: a state on a fresh database,
//! tokens, requests rows, calling the router, a free port, and an
//! [`EventTap`] to see what the gateway published.
#![allow(dead_code)]

mod tap;

// Every test binary compiles this module; not every one taps the bus.
#[allow(unused_imports)]
pub use tap::EventTap;

use std::collections::HashMap;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use sqlx::{Connection, PgPool};
use time::OffsetDateTime;
use tower::ServiceExt;
use verimail_gateway::{AppState, BusSlot, connect_pool, ops_router, router};
use verimail_shared::Config;
use verimail_shared::token::Claims;

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

pub const SECRET: &str = "gateway-test-secret";
pub const ALLOWED: &str = "https://app.example.com";
pub const PG: &str = "postgres://postgres@127.0.0.1:5432";

/// A gateway state on its own database and namespace.
pub struct TestApp {
    pub state: AppState,
    pub config: Config,
    pub db_name: String,
    pub namespace: String,
}

/// The configuration tests run with, plus `extra` variables.
pub fn config(extra: &[(&str, &str)]) -> (Config, String, String) {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let db_name = format!("gw_test_{id}");
    let namespace = format!("t-{id}");
    let mut vars: HashMap<String, String> = [
        ("DATABASE_URL", format!("{PG}/{db_name}")),
        ("VERIMAIL_NAMESPACE", namespace.clone()),
        ("VERIMAIL_SECRET_KEY", SECRET.to_owned()),
        ("RETURN_URL_ALLOWLIST", ALLOWED.to_owned()),
        ("CONFIRM_RATE_LIMIT_PER_MINUTE", "100000".to_owned()),
        ("GATEWAY_ADDR", "127.0.0.1:0".to_owned()),
        ("METRICS_ADDR", "127.0.0.1:0".to_owned()),
        // Most tests click verify_email links with GET and expect them to
        // confirm; the default (button page) has tests of its own that set
        // CONFIRM_ON_GET=false.
        ("CONFIRM_ON_GET", "true".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    for (k, v) in extra {
        vars.insert((*k).to_owned(), (*v).to_owned());
    }
    let config = Config::from_lookup(|name| vars.get(name).cloned()).expect("test config is valid");
    (config, db_name, namespace)
}

impl TestApp {
    /// A state with no broker.
    pub async fn new(extra: &[(&str, &str)]) -> Self {
        Self::with_bus(extra, BusSlot::empty()).await
    }

    /// A state with the given broker slot.
    pub async fn with_bus(extra: &[(&str, &str)], bus: BusSlot) -> Self {
        let (config, db_name, namespace) = config(extra);
        let pool = connect_pool(&config).await.expect("test database");
        let state = AppState::new(&config, pool, bus).expect("keys are configured");
        Self {
            state,
            config,
            db_name,
            namespace,
        }
    }

    pub fn pool(&self) -> &PgPool {
        self.state.pool()
    }

    /// A `v1` token for `request_id` and `purpose`, valid for an hour.
    pub fn token(&self, request_id: &str, purpose: &str) -> String {
        self.token_with(request_id, purpose, None, Duration::from_secs(3600))
    }

    /// A `v1` token with a locale and a lifetime (negative: already expired).
    pub fn token_with(
        &self,
        request_id: &str,
        purpose: &str,
        locale: Option<&str>,
        lifetime: Duration,
    ) -> String {
        let now = OffsetDateTime::now_utc();
        self.state
            .signer()
            .mint_v1(&claims(request_id, purpose, locale, now, now + lifetime))
    }

    /// A `v1` token that expired a minute ago.
    pub fn expired_token(&self, request_id: &str, locale: Option<&str>) -> String {
        let now = OffsetDateTime::now_utc();
        self.state.signer().mint_v1(&claims(
            request_id,
            "verify_email",
            locale,
            now - time::Duration::hours(2),
            now - time::Duration::minutes(1),
        ))
    }

    /// Records a request as the worker would after sending its mail.
    pub async fn insert_request(
        &self,
        id: &str,
        email: &str,
        purpose: &str,
        return_url: Option<&str>,
        context: Option<serde_json::Value>,
        sent_ago: Duration,
    ) {
        let sent_at = OffsetDateTime::now_utc() - sent_ago;
        sqlx::query(
            "INSERT INTO requests (id, user_id, email, purpose, locale, return_url, context, state, sent_at) \
             VALUES ($1, $2, $3, $4, 'en', $5, $6, 'done', $7)",
        )
        .bind(id)
        .bind(user_of(id))
        .bind(email)
        .bind(purpose)
        .bind(return_url)
        .bind(context.map(sqlx::types::Json))
        .bind(sent_at)
        .execute(self.pool())
        .await
        .expect("insert request");
    }

    pub async fn outbox(&self) -> Vec<(String, serde_json::Value)> {
        let rows: Vec<(String, Vec<u8>)> =
            sqlx::query_as("SELECT id, body FROM outbox ORDER BY id")
                .fetch_all(self.pool())
                .await
                .expect("read outbox");
        rows.into_iter()
            .map(|(id, body)| {
                (
                    id,
                    serde_json::from_slice(&body).expect("outbox body is JSON"),
                )
            })
            .collect()
    }

    pub async fn call(&self, req: Request<Body>) -> Answer {
        call(&self.state, req).await
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.call(request("GET", path, &[])).await
    }

    pub async fn post(&self, path: &str) -> Answer {
        self.call(request("POST", path, &[])).await
    }

    /// A GET on the operational router (`METRICS_ADDR`).
    pub async fn ops_get(&self, path: &str) -> Answer {
        ops_call(&self.state, request("GET", path, &[])).await
    }

    pub async fn get_json(&self, path: &str) -> Answer {
        self.call(request("GET", path, &[("accept", "application/json")]))
            .await
    }

    /// Drops the database (best effort).
    pub async fn cleanup(self) {
        self.state.pool().close().await;
        drop_database(&self.db_name).await;
    }
}

pub fn user_of(request_id: &str) -> String {
    format!("user-{request_id}")
}

pub fn claims(
    request_id: &str,
    purpose: &str,
    locale: Option<&str>,
    issued_at: OffsetDateTime,
    expires_at: OffsetDateTime,
) -> Claims {
    Claims {
        request_id: request_id.to_owned(),
        user_id: user_of(request_id),
        email: format!("{request_id}@example.com"),
        purpose: purpose.to_owned(),
        locale: locale.map(str::to_owned),
        issued_at,
        expires_at,
    }
}

pub async fn drop_database(name: &str) {
    if let Ok(mut conn) = sqlx::PgConnection::connect(&format!("{PG}/postgres")).await {
        let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut conn)
            .await;
        let _ = conn.close().await;
    }
}

/// A request with headers.
pub fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder.body(Body::empty()).expect("a valid test request")
}

/// What the router answered.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).expect("a JSON body")
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// Calls the public router (`GATEWAY_ADDR`).
pub async fn call(state: &AppState, req: Request<Body>) -> Answer {
    answer_of(router(state.clone()), req).await
}

/// Calls the operational router (`METRICS_ADDR`).
pub async fn ops_call(state: &AppState, req: Request<Body>) -> Answer {
    answer_of(ops_router(state.clone()), req).await
}

async fn answer_of(router: axum::Router, req: Request<Body>) -> Answer {
    let response = router.oneshot(req).await.expect("the router is infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .expect("a readable body");
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

/// Polls `check` until it is true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A port nothing listens on now (bound to port 0, then released), for a
/// gateway binary that must be given its address up front.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
