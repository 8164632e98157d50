//! The routers: the public one (`/confirm/{token}`, the app's
//! `/v1/codes/verify`, the providers' `/v1/webhooks/{provider}` and
//! `/v1/suppressions`, with the layers every answer goes through: security
//! headers, tracing, timeout) and the
//! operational one (`/healthz`, `/readyz`, `/metrics`), served on
//! `METRICS_ADDR` so that visitors reach neither the probes (each `/readyz`
//! asks PostgreSQL and RabbitMQ) nor the metrics, which the rate limit does
//! not cover.

pub mod codes;
pub mod confirm;
pub mod suppressions;
pub mod webhooks;

use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
    X_FRAME_OPTIONS,
};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::map_response_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::AppState;

/// Pages load nothing from elsewhere: inline styles only, no scripts, no
/// framing; forms post to the gateway itself.
pub const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; img-src 'none'; \
                       form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// [`CSP`] for a deployment: browsers apply `form-action` to the redirect that
/// answers a form, so the POST of a single-use link may only be redirected to
/// the `return_url` origins listed here (the allowlist, no wildcard).
pub fn csp(allowlist: &[url::Origin]) -> HeaderValue {
    let origins: String = allowlist
        .iter()
        .filter(|o| o.is_tuple())
        .map(|o| format!(" {}", o.ascii_serialization()))
        .collect();
    let policy = CSP.replace(
        "form-action 'self'",
        &format!("form-action 'self'{origins}"),
    );
    HeaderValue::from_str(&policy).unwrap_or_else(|_| HeaderValue::from_static(CSP))
}

/// Backstop for a request that hangs anyway (each database step has its own,
/// shorter deadline).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The gateway's public routes on `state` (`GATEWAY_ADDR`).
pub fn router(state: AppState) -> Router {
    let csp = state.inner.csp.clone();
    Router::new()
        .route(
            "/confirm/{token}",
            get(confirm::confirm)
                .post(confirm::confirm)
                .head(confirm::confirm),
        )
        .route(
            "/v1/codes/verify",
            // A larger body is answered 400 by the handler, never read whole.
            post(codes::verify).layer(DefaultBodyLimit::max(codes::MAX_BODY)),
        )
        .route(
            "/v1/webhooks/{provider}",
            post(webhooks::receive).layer(DefaultBodyLimit::max(crate::webhooks::MAX_BODY)),
        )
        .route("/v1/suppressions", get(suppressions::lookup))
        .route(
            "/v1/suppressions/{email}",
            put(suppressions::put)
                .delete(suppressions::delete)
                .layer(DefaultBodyLimit::max(suppressions::MAX_BODY)),
        )
        .with_state(state)
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            REQUEST_TIMEOUT,
        ))
        // Outside the timeout, so even its answer carries the headers.
        .layer(map_response_with_state(csp, security_headers))
        .layer(
            // The span names the route template, never the URI: the token is in the path.
            TraceLayer::new_for_http().make_span_with(|req: &Request| {
                let route = req
                    .extensions()
                    .get::<MatchedPath>()
                    .map_or("<unmatched>", MatchedPath::as_str);
                tracing::info_span!("http", method = %req.method(), route = %route)
            }),
        )
}

/// The operational routes on `state` (`METRICS_ADDR`): `/healthz`,
/// `/readyz`, `/metrics`. Bounded by the same backstop timeout; a probe
/// answers within [`crate::PROBE_TIMEOUT`] anyway.
pub fn ops_router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            REQUEST_TIMEOUT,
        ))
}

/// Headers on every answer (the contract names `/confirm`; the rest costs nothing).
async fn security_headers(State(csp): State<HeaderValue>, mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(CONTENT_SECURITY_POLICY, csp);
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AppState>) -> Response {
    let readiness = state.readiness().await;
    let code = if readiness.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "database": if readiness.database { "ok" } else { "unreachable" },
        "broker": if readiness.broker { "ok" } else { "unreachable" },
    });
    let mut response = (code, body.to_string()).into_response();
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

async fn metrics(State(state): State<AppState>) -> Response {
    // The list's size by reason, read at scrape time (an index-only count);
    // a database that does not answer at once leaves the last figures.
    let counted = tokio::time::timeout(
        Duration::from_secs(1),
        verimail_shared::suppression::count_by_reason(&state.inner.pool),
    )
    .await;
    if let Ok(Ok(counts)) = counted {
        state.inner.metrics.suppressions(&counts);
    }
    let mut response = state.inner.metrics.render().into_response();
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}
