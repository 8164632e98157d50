//! `/v1/suppressions`: the suppression list over the API, with
//! `GATEWAY_API_KEYS`.

use axum::http::StatusCode;
use serde_json::json;

use crate::common::*;
use crate::support::{KEY, api};

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
