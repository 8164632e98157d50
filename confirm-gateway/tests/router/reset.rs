//! `reset_password` links: a GET shows a form and spends nothing, the POST
//! redirects with a proof once, then the link is used; a click whose batch
//! began still gets its proof past the deadline.

use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use time::OffsetDateTime;
use verimail_gateway::{AppState, BusSlot};
use verimail_shared::token::{ProofPayload, TokenError};

use crate::common::*;
use crate::confirmations;

#[tokio::test]
async fn a_reset_password_get_shows_a_post_form_and_spends_nothing() {
    let app = TestApp::new(&[]).await;
    app.insert_request(
        "p1",
        "p1@example.com",
        "reset_password",
        Some("https://app.example.com/reset"),
        None,
        Duration::ZERO,
    )
    .await;
    let path = format!("/confirm/{}", app.token("p1", "reset_password"));
    let page = app.get(&path).await;
    assert_eq!(page.status, 200);
    assert!(
        page.body.contains("<form method=\"post\">"),
        "{}",
        page.body
    );
    assert!(page.body.contains("<button type=\"submit\">"));
    assert!(!page.body.contains("verimail_proof"));
    let json = app.get_json(&path).await;
    assert_eq!(json.status, 200);
    assert_eq!(
        json.json(),
        json!({"status": "confirm_required", "user_id": "user-p1", "email": "p1@example.com"})
    );
    // HEAD (link checkers) spends nothing either.
    let head = app.call(request("HEAD", &path, &[])).await;
    assert_eq!(head.status, 200);
    assert!(app.outbox().await.is_empty());
    assert!(confirmations(&app).await.is_empty());
    app.cleanup().await;
}

#[tokio::test]
async fn a_reset_password_post_redirects_with_a_proof_then_is_used() {
    let app = TestApp::new(&[]).await;
    app.insert_request(
        "p2",
        "p2@example.com",
        "reset_password",
        Some("https://app.example.com/reset?lang=en"),
        None,
        Duration::ZERO,
    )
    .await;
    let path = format!("/confirm/{}", app.token("p2", "reset_password"));
    let answer = app.post(&path).await;
    assert_eq!(answer.status, 303, "{}", answer.body);
    let location = url::Url::parse(answer.header("location")).expect("an absolute URL");
    assert_eq!(location.origin().ascii_serialization(), ALLOWED);
    assert_eq!(location.path(), "/reset");
    let params: Vec<(String, String)> = location.query_pairs().into_owned().collect();
    assert_eq!(params[0], ("lang".into(), "en".into()));
    assert_eq!(params[1], ("verimail".into(), "verified".into()));
    assert_eq!(params[2].0, "verimail_proof");
    let proof = app
        .state
        .signer()
        .verify_proof(&params[2].1, OffsetDateTime::now_utc())
        .expect("the proof verifies");
    assert_eq!(
        proof,
        ProofPayload {
            request_id: Some("p2".into()),
            user_id: Some("user-p2".into()),
            email: "p2@example.com".into(),
            purpose: "reset_password".into(),
        }
    );
    // Valid 900 s, not one more.
    let later = OffsetDateTime::now_utc() + time::Duration::seconds(901);
    assert!(matches!(
        app.state.signer().verify_proof(&params[2].1, later),
        Err(TokenError::Expired(_))
    ));
    let outbox = app.outbox().await;
    assert_eq!(outbox.len(), 1);
    assert_eq!(outbox[0].1["data"]["purpose"], "reset_password");

    for answer in [app.post(&path).await, app.get(&path).await] {
        assert_eq!(answer.status, 410);
        assert!(answer.body.contains("already used"), "{}", answer.body);
        assert!(!answer.body.contains("verimail_proof"));
        assert!(answer.headers.get("location").is_none());
    }
    let json = app
        .call(request("POST", &path, &[("accept", "application/json")]))
        .await;
    assert_eq!(json.status, 410);
    assert_eq!(json.json()["status"], "used");
    assert_eq!(app.outbox().await.len(), 1);
    app.cleanup().await;
}

#[tokio::test]
async fn a_reset_password_without_an_allowed_return_url_shows_a_page_without_proof() {
    let app = TestApp::new(&[]).await;
    app.insert_request(
        "p3",
        "p3@example.com",
        "reset_password",
        Some("https://gone.example.com/reset"),
        None,
        Duration::ZERO,
    )
    .await;
    let answer = app
        .post(&format!("/confirm/{}", app.token("p3", "reset_password")))
        .await;
    assert_eq!(answer.status, 200);
    assert!(answer.body.contains("Address confirmed"));
    assert!(!answer.body.contains("proof"));
    assert_eq!(app.outbox().await.len(), 1);
    app.cleanup().await;
}

#[tokio::test]
async fn a_click_whose_batch_began_gets_its_proof_even_past_the_deadline() {
    use sqlx::Connection;
    use verimail_gateway::routes::confirm::DB_DEADLINE;

    let app = TestApp::new(&[]).await;
    app.insert_request(
        "h1",
        "h1@example.com",
        "reset_password",
        Some("https://app.example.com/reset"),
        None,
        Duration::ZERO,
    )
    .await;
    // The production statement timeout (3 s) would end a batch held this
    // long; a longer one lets the test hold a begun batch past the 4 s
    // deadline, which in production happens to a click that waited in the
    // queue before its batch began.
    let url = format!("{PG}/{}", app.db_name);
    let options: sqlx::postgres::PgConnectOptions = url.parse().expect("a URL");
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options.options([("statement_timeout", "20000")]))
        .await
        .expect("a pool");
    let state = AppState::new(&app.config, pool, BusSlot::empty()).expect("keys");

    // A test connection holds the table: the batch begins, then waits.
    let mut holder = sqlx::PgConnection::connect(&url).await.expect("connect");
    sqlx::raw_sql("BEGIN; LOCK TABLE confirmations IN SHARE MODE")
        .execute(&mut holder)
        .await
        .expect("lock");
    let release = tokio::spawn(async move {
        tokio::time::sleep(DB_DEADLINE + Duration::from_secs(1)).await;
        sqlx::raw_sql("COMMIT")
            .execute(&mut holder)
            .await
            .expect("unlock");
        holder
    });

    let path = format!("/confirm/{}", app.token("h1", "reset_password"));
    let started = Instant::now();
    let answer = call(&state, request("POST", &path, &[])).await;
    let took = started.elapsed();
    assert!(
        took > DB_DEADLINE,
        "the batch was held past the deadline: {took:?}"
    );
    assert_eq!(answer.status, 303, "{}", answer.body);
    let location = url::Url::parse(answer.header("location")).expect("an absolute URL");
    let proof = location
        .query_pairs()
        .find(|(k, _)| k == "verimail_proof")
        .map(|(_, v)| v.into_owned())
        .expect("the redirect carries the proof");
    assert!(
        state
            .signer()
            .verify_proof(&proof, OffsetDateTime::now_utc())
            .is_ok()
    );
    // Single-use still: the second click is 410 `used`.
    let again = call(&state, request("POST", &path, &[])).await;
    assert_eq!(again.status, 410, "{}", again.body);
    assert_eq!(app.outbox().await.len(), 1);

    let holder = release.await.expect("the holder");
    let _ = holder.close().await;
    state.pool().close().await;
    app.cleanup().await;
}
