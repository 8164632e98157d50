//! The check API as an app's backend calls it: only configured keys are
//! heard, malformed bodies say what is wrong, wrong codes count down to a
//! lock, the right one verifies once; and the Python example does the same.

use serde_json::json;
use verimail_tests::http::{self, header};

use crate::API_KEY;
use crate::support::{Deployment, code_in, decode, shown_large, wrong};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mailed_code_verifies_once_and_wrong_codes_count_down_to_a_lock() {
    let d = Deployment::start("codes", 1, |env| {
        env.set("CODE_MAX_ATTEMPTS", "3");
    })
    .await;

    // The mail carries the link and, on a line of its own, the code; the
    // HTML part shows the same code large.
    let (id, mail) = d
        .request_mail(&[
            "--user-id",
            "42",
            "--email",
            "alice@example.com",
            "--name",
            "Alice",
            "--context",
            r#"{"signup_flow":"b"}"#,
        ])
        .await;
    let code = code_in(&mail.text).unwrap_or_else(|| panic!("no code line in:\n{}", mail.text));
    assert_eq!(code.len(), 6);
    assert!(shown_large(&mail.html, &code), "{}", mail.html);
    let link = mail
        .link
        .clone()
        .expect("CONFIRM_METHOD=both mails the link too");

    let url = format!("{}/v1/codes/verify", d.gateways[0].1);
    only_configured_keys_are_heard(&url, &code).await;
    malformed_bodies_say_what_is_wrong(&d, &url, &code).await;
    a_code_of_no_mail_is_not_found(&d, &code).await;
    wrong_codes_count_down_and_the_right_one_verifies_once(&d, &id, &code, &link).await;
    the_last_wrong_try_locks_the_code_until_a_new_request(&d).await;

    d.stop().await;
}

/// No key, a wrong key, another scheme: 401 and nothing else revealed; every
/// configured key is heard (rotation keeps the old one for a while).
async fn only_configured_keys_are_heard(url: &str, code: &str) {
    // The caller: no key, a wrong key, another scheme.
    let body = json!({"user_id": "42", "code": code}).to_string();
    for auth in [
        None,
        Some("Bearer wrong-key-0123456789"),
        Some("Basic dGVzdA=="),
    ] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        let answer = http::post_body(url, &headers, body.as_bytes())
            .await
            .expect("unauthorized check");
        let (status, json) = decode(&answer);
        assert_eq!(status, 401, "{json}");
        assert_eq!(
            json,
            json!({"status": "unauthorized"}),
            "nothing else revealed"
        );
        assert_eq!(header(&answer, "www-authenticate"), Some("Bearer"));
    }
    // Every configured key works (rotation keeps the old one for a while).
    let answer = http::post_body(
        url,
        &[("Authorization", "Bearer old-key-0123456789abc")],
        br#"{"user_id": "nobody", "code": "123456"}"#,
    )
    .await
    .expect("old key");
    assert_eq!(decode(&answer).0, 404);
}

/// Malformed bodies: 400 with what is wrong.
async fn malformed_bodies_say_what_is_wrong(d: &Deployment, url: &str, code: &str) {
    for (bad, says) in [
        (json!("not an object"), "body"),
        (json!({"code": code}), "user_id"),
        (json!({"user_id": "42"}), "code"),
        (json!({"user_id": "42", "code": "12ab56"}), "code"),
        (
            json!({"user_id": "42", "code": code, "purpose": "welcome"}),
            "purpose",
        ),
    ] {
        let (status, json) = d.check(&bad).await;
        assert_eq!(status, 400, "{bad}: {json}");
        assert_eq!(json["status"], "invalid");
        assert!(
            json["detail"].as_str().is_some_and(|t| t.starts_with(says)),
            "{bad}: {json}"
        );
    }
    let answer = http::post_body(
        url,
        &[("Authorization", &format!("Bearer {API_KEY}"))],
        b"{not json",
    )
    .await
    .expect("bad json");
    assert_eq!(decode(&answer).0, 400);
}

/// No mail for this user, or for this purpose: 404.
async fn a_code_of_no_mail_is_not_found(d: &Deployment, code: &str) {
    let (status, json) = d.check(&json!({"user_id": 43, "code": code})).await;
    assert_eq!((status, json), (404, json!({"status": "no_code"})));
    let (status, _) = d
        .check(&json!({"user_id": "42", "purpose": "reset_password", "code": code}))
        .await;
    assert_eq!(status, 404);
}

/// Wrong codes count down (the body names the mail), the right one verifies
/// and the event says how; then code and link both hear `already_verified`,
/// and one event went out.
async fn wrong_codes_count_down_and_the_right_one_verifies_once(
    d: &Deployment,
    id: &str,
    code: &str,
    link: &str,
) {
    // Wrong codes count down; the body names the mail.
    for left in [2, 1] {
        let (status, json) = d
            .check(&json!({"user_id": 42, "code": wrong(code, left)}))
            .await;
        assert_eq!(status, 422, "{json}");
        assert_eq!(json["status"], "wrong_code");
        assert_eq!(json["attempts_left"], left);
        assert_eq!(json["request_id"], id);
        assert_eq!(json["email"], "alice@example.com");
        assert_eq!(json["user_id"], "42");
        assert_eq!(json["purpose"], "verify_email");
    }

    // The right code (one try left) verifies, and the event says how.
    let (status, json) = d.check(&json!({"user_id": 42, "code": code})).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(
        json,
        json!({"status": "verified", "user_id": "42", "email": "alice@example.com",
               "purpose": "verify_email", "request_id": id})
    );
    let event = d.wait_verified(id).await;
    assert_eq!(event["data"]["method"], "code");
    assert_eq!(event["data"]["user_id"], "42");
    assert_eq!(event["data"]["email"], "alice@example.com");
    assert_eq!(event["data"]["context"]["signup_flow"], "b");

    // Again by code, then by the link of the same mail: already verified.
    let (status, json) = d.check(&json!({"user_id": "42", "code": code})).await;
    assert_eq!((status, &json["status"]), (200, &json!("already_verified")));
    let pressed = http::post(link, &[("Accept", "application/json")])
        .await
        .expect("press");
    assert_eq!(pressed.0, 200, "{}", pressed.2);
    assert!(pressed.2.contains("already_verified"), "{}", pressed.2);
    // One event for the mail, whatever came after.
    d.barrier().await;
    assert_eq!(d.verified_of(id).len(), 1);
}

/// Another user: the last allowed wrong try answers 422 with nothing left,
/// then the code is dead even for the right digits; a new request mails a
/// new code, which works.
async fn the_last_wrong_try_locks_the_code_until_a_new_request(d: &Deployment) {
    let (first_id, mail) = d
        .request_mail(&["--user-id", "45", "--email", "bob@example.com"])
        .await;
    let first_code = code_in(&mail.text).expect("a code");
    for left in [2, 1, 0] {
        let (status, json) = d
            .check(&json!({"user_id": "45", "code": wrong(&first_code, left)}))
            .await;
        assert_eq!(
            (status, &json["attempts_left"]),
            (422, &json!(left)),
            "{json}"
        );
    }
    let (status, json) = d
        .check(&json!({"user_id": "45", "code": wrong(&first_code, 7)}))
        .await;
    assert_eq!((status, &json["status"]), (410, &json!("locked")), "{json}");
    assert_eq!(json["request_id"], first_id.as_str());
    let (status, json) = d.check(&json!({"user_id": "45", "code": first_code})).await;
    assert_eq!((status, &json["status"]), (410, &json!("locked")), "{json}");

    // A new request mails a new code, which works.
    let (second_id, mail) = d
        .request_mail(&["--user-id", "45", "--email", "bob@example.com"])
        .await;
    let second_code = code_in(&mail.text).expect("a code");
    let (status, json) = d
        .check(&json!({"user_id": "45", "code": second_code}))
        .await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["request_id"], second_id.as_str());
    assert_eq!(d.wait_verified(&second_id).await["data"]["method"], "code");
    assert!(d.verified_of(&first_id).is_empty());
}

/// `examples/python/check_code.py`, run as its docstring says, against a
/// live gateway: a wrong code is refused with exit 1 and the right one
/// verifies with exit 0, as an app's backend would see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_checks_a_mailed_code_as_an_app_backend_would() {
    let d = Deployment::start("codes-python", 1, |_| {}).await;
    let (id, mail) = d
        .request_mail(&["--user-id", "31", "--email", "eve@example.com"])
        .await;
    let code = code_in(&mail.text).unwrap_or_else(|| panic!("no code line in:\n{}", mail.text));
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/python/check_code.py"
    );
    let run = |typed: String| {
        let gateway = d.gateways[0].1.clone();
        async move {
            let out = tokio::process::Command::new("python3")
                .arg(script)
                .args(["31", &typed])
                .env("VERIMAIL_GATEWAY", gateway)
                .env("VERIMAIL_API_KEY", API_KEY)
                .output()
                .await
                .expect("python3 runs");
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
            )
        }
    };
    let (exit, out) = run(wrong(&code, 1)).await;
    assert_eq!(exit, Some(1), "{out}");
    assert!(
        out.starts_with("422 ") && out.contains("wrong_code"),
        "{out}"
    );
    let (exit, out) = run(code.clone()).await;
    assert_eq!(exit, Some(0), "{out}");
    assert!(
        out.starts_with("200 ") && out.contains("\"verified\""),
        "{out}"
    );
    assert_eq!(d.wait_verified(&id).await["data"]["method"], "code");
    d.stop().await;
}
