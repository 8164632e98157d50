//! Postmark: HTTP basic auth with the configured user and password; a
//! bounce is tied to its mail by Postmark's `MessageID`.

use axum::http::StatusCode;
use serde_json::json;

use crate::common::*;
use crate::sendgrid::SendgridKey;
use crate::support::{
    app, b64, events, post, sent_through_provider, sent_through_provider_by_an_earlier_release,
    suppressions,
};

/// The `USER:PASSWORD` in `WEBHOOK_SECRETS`.
pub const POSTMARK: &str = "hooks:s3cret-pass";

/// `Authorization: Basic` with `credentials` (`USER:PASSWORD`).
pub fn basic_auth(credentials: &str) -> Vec<(String, String)> {
    vec![(
        "Authorization".to_owned(),
        format!("Basic {}", b64(credentials.as_bytes())),
    )]
}

/// POSTs `body` with `credentials` in basic auth, as Postmark does.
pub async fn post_postmark(app: &TestApp, credentials: &str, body: &str) -> Answer {
    app.call(post("postmark", body, &basic_auth(credentials)))
        .await
}

#[tokio::test]
async fn postmark_needs_its_basic_auth_and_ties_a_bounce_by_its_message_id() {
    let sg = SendgridKey::new();
    let (app, _) = app(&sg, &[]).await;
    sent_through_provider(
        &app,
        "r3",
        "ivy@example.com",
        "883953f4-6105-42a2-a16a-77a8eac79483",
    )
    .await;
    // Postmark's documented HardBounce sample, our address and id in it.
    let bounce = json!({"RecordType": "Bounce", "MessageStream": "outbound", "ID": 4323372036854775807_u64,
        "Type": "HardBounce", "TypeCode": 1, "Name": "Hard bounce", "Tag": "Test",
        "MessageID": "883953f4-6105-42a2-a16a-77a8eac79483", "ServerID": 23,
        "Description": "The server was unable to deliver your message (ex: unknown user, mailbox not found).",
        "Details": "smtp;550 5.1.1 The email account that you tried to reach does not exist.",
        "Email": "ivy@example.com", "From": "no-reply@example.com", "BouncedAt": "2026-12-05T10:00:00.1234567-05:00",
        "DumpAvailable": true, "Inactive": true, "CanActivate": true, "Subject": "Confirm"})
    .to_string();
    for bad in ["hooks:wrong", "other:s3cret-pass", "hooks"] {
        let answer = post_postmark(&app, bad, &bounce).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    }
    let answer = app.call(post("postmark", &bounce, &[])).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert!(suppressions(&app).await.is_empty());

    for _ in 0..2 {
        let answer = post_postmark(&app, POSTMARK, &bounce).await;
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
    let answer = post_postmark(&app, POSTMARK, &complaint).await;
    assert_eq!(answer.status, StatusCode::OK);
    let delivery =
        json!({"RecordType": "Delivery", "ID": 43, "Recipient": "ivy@example.com"}).to_string();
    let answer = post_postmark(&app, POSTMARK, &delivery).await;
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

#[tokio::test]
async fn a_bounce_finds_a_mail_whose_provider_id_an_earlier_release_recorded() {
    // During a rolling upgrade a worker of the earlier release records the
    // provider's id on the request row, not in `provider_messages`.
    let sg = SendgridKey::new();
    let (app, _) = app(&sg, &[]).await;
    sent_through_provider_by_an_earlier_release(&app, "r9", "lee@example.com", "pm-old-0001").await;
    let bounce = json!({"RecordType": "Bounce", "ID": 7, "Type": "HardBounce", "TypeCode": 1,
        "MessageID": "pm-old-0001", "Email": "lee@example.com", "BouncedAt": "2026-12-05T10:00:00Z",
        "Details": "smtp;550 5.1.1 unknown user", "Inactive": true})
    .to_string();
    let answer = post_postmark(&app, POSTMARK, &bounce).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    let bounced = events(&app, "verimail.email.bounced").await;
    assert_eq!(bounced.len(), 1);
    assert_eq!(bounced[0]["request_id"], "r9");
    assert_eq!(bounced[0]["user_id"], "user-r9");
}
