//! `verify_email` links: a click confirms once, with a page, a JSON answer
//! or a redirect to an allowlisted `return_url`, and one outbox event however
//! often or concurrently it is clicked; by default a GET shows the button and
//! only its POST confirms.

use std::time::Duration;

use serde_json::json;
use time::OffsetDateTime;
use verimail_shared::events::{EMAIL_VERIFIED, Event};

use crate::common::*;
use crate::{confirmations, confirmations_key_event};

#[tokio::test]
async fn a_verify_email_link_confirms_with_a_page_and_one_outbox_event() {
    let app = TestApp::new(&[]).await;
    app.insert_request(
        "r1",
        "r1@example.com",
        "verify_email",
        None,
        Some(json!({"flow": "b"})),
        Duration::from_secs(5),
    )
    .await;
    let token = app.token("r1", "verify_email");

    let answer = app.get(&format!("/confirm/{token}")).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(answer.header("content-type").starts_with("text/html"));
    assert!(answer.body.contains("Address confirmed"), "{}", answer.body);
    assert!(answer.body.contains("r1@example.com"));

    let outbox = app.outbox().await;
    assert_eq!(outbox.len(), 1);
    let (id, event) = &outbox[0];
    let confirmations = confirmations(&app).await;
    assert_eq!(
        confirmations_key_event(&confirmations, "r:r1").as_ref(),
        Some(id)
    );
    assert_eq!(event["id"], json!(id));
    assert_eq!(event["type"], EMAIL_VERIFIED);
    assert_eq!(event["source"], "/verimail/gateway");
    assert_eq!(event["specversion"], "1.0");
    assert_eq!(event["datacontenttype"], "application/json");
    assert_eq!(event["data"]["request_id"], "r1");
    assert_eq!(event["data"]["user_id"], "user-r1");
    assert_eq!(event["data"]["email"], "r1@example.com");
    assert_eq!(event["data"]["purpose"], "verify_email");
    assert_eq!(event["data"]["context"], json!({"flow": "b"}));
    assert!(
        event["data"]["verified_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    // The id is a UUIDv7 and the event decodes with the shared types.
    assert_eq!(
        uuid::Uuid::parse_str(id).map(|u| u.get_version_num()).ok(),
        Some(7)
    );
    let bytes = serde_json::to_vec(event).expect("re-encode");
    assert!(matches!(Event::decode(&bytes), Ok(Event::Verified(_))));
    app.cleanup().await;
}

#[tokio::test]
async fn json_clients_get_the_status_user_and_email() {
    let app = TestApp::new(&[]).await;
    let token = app.token("r2", "verify_email");
    let answer = app.get_json(&format!("/confirm/{token}")).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("content-type"), "application/json");
    assert_eq!(
        answer.json(),
        json!({"status": "verified", "user_id": "user-r2", "email": "r2@example.com"})
    );
    // Unknown request row: the event's context is null.
    let outbox = app.outbox().await;
    assert_eq!(outbox[0].1["data"]["context"], serde_json::Value::Null);

    let again = app.get_json(&format!("/confirm/{token}")).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.json()["status"], "already_verified");
    app.cleanup().await;
}

#[tokio::test]
async fn an_allowlisted_return_url_gets_a_303_with_verimail_verified() {
    let app = TestApp::new(&[]).await;
    app.insert_request(
        "r3",
        "r3@example.com",
        "verify_email",
        Some("https://app.example.com/welcome?step=2"),
        None,
        Duration::ZERO,
    )
    .await;
    let token = app.token("r3", "verify_email");
    let answer = app.get(&format!("/confirm/{token}")).await;
    assert_eq!(answer.status, 303);
    assert_eq!(
        answer.header("location"),
        "https://app.example.com/welcome?step=2&verimail=verified"
    );
    // Second click: the same redirect says already_verified; JSON keeps the 303.
    let again = app.get_json(&format!("/confirm/{token}")).await;
    assert_eq!(again.status, 303);
    assert_eq!(
        again.header("location"),
        "https://app.example.com/welcome?step=2&verimail=already_verified"
    );
    assert_eq!(again.json()["status"], "already_verified");
    assert_eq!(again.json()["redirect"], again.header("location"));
    assert_eq!(app.outbox().await.len(), 1);
    app.cleanup().await;
}

#[tokio::test]
async fn a_return_url_no_longer_allowlisted_gets_the_page_not_a_redirect() {
    let app = TestApp::new(&[]).await;
    app.insert_request(
        "r4",
        "r4@example.com",
        "verify_email",
        Some("https://old.example.com/welcome"),
        None,
        Duration::ZERO,
    )
    .await;
    let answer = app
        .get(&format!("/confirm/{}", app.token("r4", "verify_email")))
        .await;
    assert_eq!(answer.status, 200);
    assert!(answer.headers.get("location").is_none());
    assert!(answer.body.contains("Address confirmed"));
    app.cleanup().await;
}

#[tokio::test]
async fn a_second_click_is_already_verified_without_a_second_event() {
    let app = TestApp::new(&[]).await;
    let path = format!("/confirm/{}", app.token("r5", "verify_email"));
    assert_eq!(app.get(&path).await.status, 200);
    let again = app.get(&path).await;
    assert_eq!(again.status, 200);
    assert!(again.body.contains("Already confirmed"), "{}", again.body);
    // POST confirms too, with the same answer.
    let post = app.post(&path).await;
    assert_eq!(post.status, 200);
    assert!(post.body.contains("Already confirmed"));
    assert_eq!(app.outbox().await.len(), 1);
    assert_eq!(confirmations(&app).await.len(), 1);
    app.cleanup().await;
}

#[tokio::test]
async fn concurrent_clicks_record_one_confirmation_and_one_event() {
    let app = TestApp::new(&[]).await;
    let path = format!("/confirm/{}", app.token("r6", "verify_email"));
    let answers = futures_util::future::join_all((0..8).map(|_| app.get_json(&path))).await;
    let verified = answers
        .iter()
        .filter(|a| a.json()["status"] == "verified")
        .count();
    let already = answers
        .iter()
        .filter(|a| a.json()["status"] == "already_verified")
        .count();
    assert_eq!((verified, already), (1, 7));
    assert_eq!(app.outbox().await.len(), 1);
    app.cleanup().await;
}

#[tokio::test]
async fn by_default_a_get_never_confirms_and_the_button_post_does() {
    let app = TestApp::new(&[("CONFIRM_ON_GET", "false"), ("ACCEPT_ITSDANGEROUS", "true")]).await;
    app.insert_request(
        "g1",
        "g1@example.com",
        "verify_email",
        None,
        None,
        Duration::ZERO,
    )
    .await;
    let path = format!("/confirm/{}", app.token("g1", "verify_email"));
    // A mail scanner's GET, twice: the button page, nothing recorded.
    for _ in 0..2 {
        let json = app.get_json(&path).await;
        assert_eq!(json.status, 200, "{}", json.body);
        assert_eq!(json.json()["status"], "confirm_required");
        let page = app.get(&path).await;
        assert_eq!(page.status, 200);
        assert!(page.body.contains("<form"), "{}", page.body);
        assert!(page.body.contains("method=\"post\"") || page.body.contains("method=post"));
        assert!(!page.body.contains("works only once"), "{}", page.body);
    }
    let legacy = app
        .state
        .signer()
        .mint_itsdangerous("g1@example.com", OffsetDateTime::now_utc());
    let json = app.get_json(&format!("/confirm/{legacy}")).await;
    assert_eq!(json.json()["status"], "confirm_required");
    assert!(confirmations(&app).await.is_empty());
    assert!(app.outbox().await.is_empty());

    // The button's POST confirms, once.
    let answer = app
        .call(request("POST", &path, &[("accept", "application/json")]))
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.json()["status"], "verified");
    assert_eq!(app.outbox().await.len(), 1);
    let again = app.get_json(&path).await;
    assert_eq!(again.json()["status"], "already_verified");
    let again = app
        .call(request("POST", &path, &[("accept", "application/json")]))
        .await;
    assert_eq!(again.json()["status"], "already_verified");
    assert_eq!(app.outbox().await.len(), 1);
    app.cleanup().await;
}
