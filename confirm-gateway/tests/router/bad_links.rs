//! Links that confirm nothing: expired (410, in the token's locale, naming no
//! address), malformed, tampered or signed with another key (400), and paths
//! that are not links (404).

use std::time::{Duration, Instant};

use serde_json::json;
use time::OffsetDateTime;

use crate::common::*;

#[tokio::test]
async fn an_expired_link_is_410_in_the_token_locale_and_names_no_address() {
    let app = TestApp::new(&[]).await;
    let en = app
        .get(&format!("/confirm/{}", app.expired_token("x1", None)))
        .await;
    assert_eq!(en.status, 410);
    assert!(en.body.contains("This link has expired"), "{}", en.body);
    assert!(en.body.contains("ask for a new link"));
    assert!(!en.body.contains("x1@example.com"));

    let zh = app
        .get(&format!(
            "/confirm/{}",
            app.expired_token("x2", Some("zh-CN"))
        ))
        .await;
    assert_eq!(zh.status, 410);
    assert!(zh.body.contains("lang=\"zh-CN\""));
    assert!(zh.body.contains("此链接已过期"), "{}", zh.body);

    // No claim locale: Accept-Language decides.
    let token = app.expired_token("x3", None);
    let zh = app
        .call(request(
            "GET",
            &format!("/confirm/{token}"),
            &[("accept-language", "zh-CN,zh;q=0.9")],
        ))
        .await;
    assert!(zh.body.contains("lang=\"zh-CN\""));

    let json = app.get_json(&format!("/confirm/{token}")).await;
    assert_eq!(json.status, 410);
    assert_eq!(
        json.json(),
        json!({"status": "expired", "user_id": null, "email": null})
    );
    assert!(app.outbox().await.is_empty());
    app.cleanup().await;
}

#[tokio::test]
async fn malformed_tampered_and_unknown_key_links_are_400() {
    let app = TestApp::new(&[]).await;
    let good = app.token("b1", "verify_email");
    let mut tampered = good.clone().into_bytes();
    let last = tampered.len() - 5;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).expect("ascii");
    let other = TestApp::new(&[("VERIMAIL_SECRET_KEY", "another-secret")]).await;
    let unknown_key = other.token("b1", "verify_email");
    let other_purpose = {
        let now = OffsetDateTime::now_utc();
        app.state.signer().mint_v1(&claims(
            "b2",
            "launch_rockets",
            None,
            now,
            now + time::Duration::hours(1),
        ))
    };
    let legacy = app
        .state
        .signer()
        .mint_itsdangerous("b1@example.com", OffsetDateTime::now_utc());
    let long = "v1.".to_owned() + &"A".repeat(20_000);
    let cases = [
        tampered.as_str(),
        unknown_key.as_str(),
        other_purpose.as_str(),
        "garbage",
        "v1.a.b.c",
        "%F0%9F%98%80",
        "%ZZ",
        legacy.as_str(), // ACCEPT_ITSDANGEROUS is off
        long.as_str(),
    ];
    for token in cases {
        let started = Instant::now();
        let answer = app.get_json(&format!("/confirm/{token}")).await;
        assert_eq!(answer.status, 400, "{}", &token[..token.len().min(40)]);
        assert_eq!(
            answer.json(),
            json!({"status": "invalid", "user_id": null, "email": null})
        );
        assert!(started.elapsed() < Duration::from_secs(1));
        let page = app.get(&format!("/confirm/{token}")).await;
        assert!(page.body.contains("This link is not valid"));
    }
    assert!(app.outbox().await.is_empty());
    other.cleanup().await;
    app.cleanup().await;
}

#[tokio::test]
async fn unknown_paths_are_404() {
    let app = TestApp::new(&[]).await;
    for path in [
        "/",
        "/confirm",
        "/confirm/",
        "/confirm/a/b",
        "/nope",
        "/metrics/x",
    ] {
        let answer = app.get(path).await;
        assert_eq!(answer.status, 404, "{path}");
    }
    app.cleanup().await;
}
