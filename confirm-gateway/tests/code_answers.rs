//! `POST /v1/codes/verify` through the router, on a real database: the
//! answers the end-to-end tests cannot reach quickly (expiry, no keys at all,
//! an oversized body, the rate limit, itsdangerous deployments).

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::*;
use serde_json::json;
use time::OffsetDateTime;

const KEY: &str = "gateway-test-api-key-01";
const CODE: &str = "482913";

/// A mail sent `sent_ago` ago to request `id`'s user, carrying [`CODE`].
async fn mail_with_code(app: &TestApp, id: &str, purpose: &str, sent_ago: Duration) {
    app.insert_request(
        id,
        &format!("{id}@example.com"),
        purpose,
        None,
        None,
        sent_ago,
    )
    .await;
    let hash = app.state.signer().code_hash(id, CODE);
    sqlx::query("UPDATE requests SET code_hash = $2 WHERE id = $1")
        .bind(id)
        .bind(hash)
        .execute(app.pool())
        .await
        .expect("store the code's hash");
}

fn check(body: impl Into<Body>, key: Option<&str>) -> Request<Body> {
    let mut builder = Request::builder()
        .method("POST")
        .uri("/v1/codes/verify")
        .header("Content-Type", "application/json");
    if let Some(key) = key {
        builder = builder.header("Authorization", format!("Bearer {key}"));
    }
    builder.body(body.into()).expect("a valid request")
}

fn body(user: &str, code: &str) -> String {
    json!({"user_id": user, "code": code}).to_string()
}

#[tokio::test]
async fn a_code_past_the_token_lifetime_answers_410_expired() {
    let app = TestApp::new(&[("GATEWAY_API_KEYS", KEY), ("TOKEN_TTL_SECONDS", "3600")]).await;
    mail_with_code(&app, "old", "verify_email", Duration::from_secs(3601)).await;
    let answer = call(&app.state, check(body(&user_of("old"), CODE), Some(KEY))).await;
    assert_eq!(answer.status, StatusCode::GONE, "{}", answer.body);
    assert_eq!(
        answer.json(),
        json!({"status": "expired", "user_id": "user-old", "email": "old@example.com",
               "purpose": "verify_email", "request_id": "old"})
    );
    // A fresh mail's code still works.
    mail_with_code(&app, "new", "verify_email", Duration::from_secs(3599)).await;
    let answer = call(&app.state, check(body(&user_of("new"), CODE), Some(KEY))).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    app.cleanup().await;
}

#[tokio::test]
async fn without_configured_keys_the_api_refuses_everyone() {
    let app = TestApp::new(&[]).await;
    mail_with_code(&app, "r1", "verify_email", Duration::ZERO).await;
    for key in [None, Some(""), Some(KEY), Some("anything-at-all-0123")] {
        let answer = call(&app.state, check(body(&user_of("r1"), CODE), key)).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{key:?}");
        assert_eq!(answer.json(), json!({"status": "unauthorized"}));
    }
    app.cleanup().await;
}

#[tokio::test]
async fn a_mail_without_a_code_and_an_oversized_body_are_refused_clearly() {
    let app = TestApp::new(&[("GATEWAY_API_KEYS", KEY)]).await;
    // Sent with CONFIRM_METHOD=link: no code to check.
    app.insert_request(
        "link-only",
        "l@example.com",
        "verify_email",
        None,
        None,
        Duration::ZERO,
    )
    .await;
    let answer = call(
        &app.state,
        check(body(&user_of("link-only"), CODE), Some(KEY)),
    )
    .await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(answer.json(), json!({"status": "no_code"}));

    let huge = format!(
        r#"{{"user_id": "u", "code": "{CODE}", "pad": "{}"}}"#,
        "x".repeat(16 * 1024)
    );
    let answer = call(&app.state, check(huge, Some(KEY))).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.body);
    assert_eq!(answer.json()["status"], "invalid");
    assert!(
        answer.json()["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("body")),
        "{}",
        answer.body
    );
    app.cleanup().await;
}

#[tokio::test]
async fn the_per_client_rate_limit_covers_code_checks() {
    let app = TestApp::new(&[
        ("GATEWAY_API_KEYS", KEY),
        ("CONFIRM_RATE_LIMIT_PER_MINUTE", "2"),
    ])
    .await;
    for _ in 0..2 {
        let answer = call(&app.state, check(body("nobody", CODE), Some(KEY))).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND);
    }
    // Even a caller without a key is limited: guessing keys costs the same.
    for key in [Some(KEY), None] {
        let answer = call(&app.state, check(body("nobody", CODE), key)).await;
        assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(answer.json(), json!({"status": "rate_limited"}));
        assert!(
            answer
                .header("retry-after")
                .parse::<u64>()
                .is_ok_and(|s| s >= 1)
        );
    }
    app.cleanup().await;
}

#[tokio::test]
async fn with_itsdangerous_links_a_code_and_the_legacy_link_are_one_confirmation() {
    let app = TestApp::new(&[("GATEWAY_API_KEYS", KEY), ("TOKEN_FORMAT", "itsdangerous")]).await;
    mail_with_code(&app, "legacy", "verify_email", Duration::ZERO).await;
    let answer = call(&app.state, check(body(&user_of("legacy"), CODE), Some(KEY))).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(answer.json()["status"], "verified");
    // The legacy link of that address (only the address inside) was spent with it.
    let token = app
        .state
        .signer()
        .mint_itsdangerous("legacy@example.com", OffsetDateTime::now_utc());
    let clicked = call(
        &app.state,
        request(
            "GET",
            &format!("/confirm/{token}"),
            &[("Accept", "application/json")],
        ),
    )
    .await;
    assert_eq!(
        clicked.json()["status"],
        "already_verified",
        "{}",
        clicked.body
    );
    // One event, saying how.
    let outbox = app.outbox().await;
    assert_eq!(outbox.len(), 1, "{outbox:?}");
    assert_eq!(outbox[0].1["data"]["method"], "code");
    assert_eq!(outbox[0].1["data"]["request_id"], "legacy");
    app.cleanup().await;
}
