//! Group commit: many clicks at once are recorded in shared statements, and
//! each still gets exactly its own answer and, when first, exactly one event.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use futures_util::future::join_all;
use serde_json::json;
use time::OffsetDateTime;
use verimail_gateway::writer::{Confirmation, Writer};
use verimail_shared::events::{Purpose, VerifyMethod};

#[tokio::test]
async fn a_burst_of_clicks_confirms_each_link_once_with_its_own_event() {
    let app = TestApp::new(&[("ACCEPT_ITSDANGEROUS", "true")]).await;
    // v1 links with a requests row (context, return_url), some without one,
    // and legacy links whose ids come from the latest mail to the address.
    for i in 0..20 {
        let return_url = (i % 2 == 0).then_some("https://app.example.com/done");
        app.insert_request(
            &format!("b{i}"),
            &format!("b{i}@example.com"),
            "verify_email",
            return_url,
            Some(json!({"i": i})),
            Duration::from_secs(60),
        )
        .await;
    }
    for i in 0..5 {
        app.insert_request(
            &format!("l{i}"),
            &format!("legacy{i}@example.com"),
            "verify_email",
            None,
            Some(json!({"legacy": i})),
            Duration::from_secs(60),
        )
        .await;
    }
    let now = OffsetDateTime::now_utc();
    let mut paths = Vec::new();
    for i in 0..30 {
        let path = format!("/confirm/{}", app.token(&format!("b{i}"), "verify_email"));
        // Every link clicked twice in the same burst.
        paths.push((format!("r:b{i}"), path.clone()));
        paths.push((format!("r:b{i}"), path));
    }
    for i in 0..5 {
        let token = app
            .state
            .signer()
            .mint_itsdangerous(&format!("legacy{i}@example.com"), now);
        paths.push((
            format!("e:legacy{i}@example.com"),
            format!("/confirm/{token}"),
        ));
    }
    let answers = join_all(paths.iter().map(|(_, path)| app.get_json(path))).await;

    let mut by_key: HashMap<&str, Vec<String>> = HashMap::new();
    for ((key, _), answer) in paths.iter().zip(&answers) {
        assert!(
            answer.status == 200 || answer.status == 303,
            "{key}: {} {}",
            answer.status,
            answer.body
        );
        let status = answer.json()["status"]
            .as_str()
            .expect("a status")
            .to_owned();
        by_key.entry(key).or_default().push(status);
    }
    for (key, mut statuses) in by_key {
        statuses.sort();
        let expected: &[&str] = if key.starts_with("e:") {
            &["verified"]
        } else {
            &["already_verified", "verified"]
        };
        assert_eq!(statuses, expected, "{key}");
    }
    // The redirect of a link with a return_url, whichever click came first.
    let redirected = answers.iter().filter(|a| a.status == 303).count();
    assert_eq!(redirected, 20, "10 links with a return_url, clicked twice");

    let outbox = app.outbox().await;
    assert_eq!(outbox.len(), 35, "one event per link");
    let events: HashMap<String, String> = sqlx::query_as("SELECT key, event_id FROM confirmations")
        .fetch_all(app.pool())
        .await
        .expect("read confirmations")
        .into_iter()
        .collect();
    assert_eq!(events.len(), 35);
    for (id, event) in &outbox {
        assert_eq!(&event["id"], id);
        let data = &event["data"];
        let email = data["email"].as_str().expect("an email");
        if let Some(n) = email.strip_prefix("legacy") {
            let i: u32 = n
                .trim_end_matches("@example.com")
                .parse()
                .expect("a number");
            assert_eq!(data["request_id"], format!("l{i}"));
            assert_eq!(data["user_id"], format!("user-l{i}"));
            assert_eq!(data["context"], json!({"legacy": i}));
            assert_eq!(events[&format!("e:{email}")], *id);
        } else {
            let request_id = data["request_id"].as_str().expect("a request id");
            let i: u32 = request_id[1..].parse().expect("a number");
            assert_eq!(data["user_id"], user_of(request_id));
            let context = if i < 20 { json!({"i": i}) } else { json!(null) };
            assert_eq!(data["context"], context, "{request_id}");
            assert_eq!(events[&format!("r:{request_id}")], *id);
        }
    }
    app.cleanup().await;
}

fn confirmation(key: &str, email: &str) -> Confirmation {
    Confirmation {
        key: key.to_owned(),
        request_id: Some(key.to_owned()),
        user_id: Some("u".to_owned()),
        email: email.to_owned(),
        purpose: Purpose::VerifyEmail,
        legacy: false,
        at: OffsetDateTime::now_utc(),
        method: VerifyMethod::Link,
    }
}

#[tokio::test]
async fn a_row_the_database_refuses_does_not_fail_the_rest_of_its_batch() {
    let app = TestApp::new(&[]).await;
    let writer = Writer::new(app.pool().clone(), Default::default(), Default::default());
    // PostgreSQL text cannot hold NUL (the handler refuses it before this;
    // the writer must not let it sink its neighbours).
    let batch = [
        confirmation("w1", "w1@example.com"),
        confirmation("w2", "w2\0@example.com"),
        confirmation("w3", "w3@example.com"),
    ];
    let answers = join_all(batch.iter().cloned().map(|c| writer.record(c))).await;
    assert!(answers[0].as_ref().is_ok_and(|r| r.first), "{answers:?}");
    assert!(
        answers[1].as_ref().is_err_and(|e| e.is_data_exception()),
        "{answers:?}"
    );
    assert!(answers[2].as_ref().is_ok_and(|r| r.first), "{answers:?}");
    assert_eq!(app.outbox().await.len(), 2);
    // Recorded once: the same confirmations again are not first.
    let again = join_all([&batch[0], &batch[2]].map(|c| writer.record(c.clone()))).await;
    assert!(again.iter().all(|r| r.as_ref().is_ok_and(|r| !r.first)));
    drop(writer);
    app.cleanup().await;
}
