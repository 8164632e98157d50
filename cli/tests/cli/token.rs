//! `verimail token mint` and `verimail token inspect`: v1 and itsdangerous
//! tokens, valid, tampered and expired.

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::namespace;
use crate::support::{SECRET, command, run, stderr, stdout};

async fn inspect(ns: &str, env: &[(&str, &str)], token: &str) -> (Option<i32>, Value) {
    let out = run(ns, env, &["token", "inspect", token]).await;
    let object = serde_json::from_str(stdout(&out).trim()).expect("one JSON object");
    (out.status.code(), object)
}

#[tokio::test]
async fn a_minted_token_inspects_as_valid_and_a_tampered_one_as_invalid() {
    let ns = namespace();
    let env = [("VERIMAIL_SECRET_KEY", SECRET)];
    let out = run(
        &ns,
        &env,
        &[
            "token",
            "mint",
            "--email",
            "alice@example.com",
            "--user-id",
            "42",
            "--purpose",
            "reset_password",
            "--locale",
            "zh-CN",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0));
    let token = stdout(&out).trim().to_owned();
    assert!(token.starts_with("v1."), "{token}");
    assert!(!stderr(&out).contains(&token), "the token is not logged");

    let (code, object) = inspect(&ns, &env, &token).await;
    assert_eq!(code, Some(0));
    assert_eq!(object["status"], "valid");
    assert_eq!(object["format"], "v1");
    assert_eq!(object["payload"]["email"], "alice@example.com");
    assert_eq!(object["payload"]["user_id"], "42");
    assert_eq!(object["payload"]["purpose"], "reset_password");
    assert!(object["issued_at"].is_string() && object["expires_at"].is_string());

    // The same token inside a link is recognised.
    let (code, _) = inspect(
        &ns,
        &env,
        &format!("http://127.0.0.1:8080/confirm/{token}?x=1"),
    )
    .await;
    assert_eq!(code, Some(0));

    // One character changed in the payload.
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let flipped = if parts[2].ends_with('A') { 'B' } else { 'A' };
    parts[2].pop();
    parts[2].push(flipped);
    let (code, object) = inspect(&ns, &env, &parts.join(".")).await;
    assert_eq!(code, Some(1));
    assert_eq!(object["status"], "invalid");
    assert_eq!(object["payload"], Value::Null);

    // Another secret does not accept it.
    let (code, object) = inspect(&ns, &[("VERIMAIL_SECRET_KEY", "other")], &token).await;
    assert_eq!(
        (code, object["status"].clone()),
        (Some(1), Value::from("invalid"))
    );

    // A bad email is a usage error; no secret is a configuration failure.
    let out = run(&ns, &env, &["token", "mint", "--email", "nope"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--email"));
    let out = run(&ns, &[], &["token", "mint", "--email", "a@example.com"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("VERIMAIL_SECRET_KEY"));
}

#[tokio::test]
async fn an_expired_token_inspects_as_expired_with_exit_1() {
    let ns = namespace();
    let env = [("VERIMAIL_SECRET_KEY", SECRET), ("TOKEN_TTL_SECONDS", "1")];
    let out = run(
        &ns,
        &env,
        &["token", "mint", "--email", "alice@example.com"],
    )
    .await;
    let token = stdout(&out).trim().to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, object) = inspect(&ns, &env, &token).await;
        if object["status"] == "expired" {
            assert_eq!(code, Some(1));
            assert_eq!(object["payload"]["email"], "alice@example.com");
            break;
        }
        assert_eq!(object["status"], "valid");
        assert!(Instant::now() < deadline, "the token expires after 1 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn an_itsdangerous_token_is_recognised_whatever_the_configured_format() {
    let ns = namespace();
    let minting = [
        ("VERIMAIL_SECRET_KEY", SECRET),
        ("TOKEN_FORMAT", "itsdangerous"),
    ];
    let out = run(
        &ns,
        &minting,
        &["token", "mint", "--email", "alice@example.com"],
    )
    .await;
    assert_eq!(out.status.code(), Some(0));
    let token = stdout(&out).trim().to_owned();
    assert!(!token.starts_with("v1."));
    assert_eq!(
        token.split('.').count(),
        3,
        "payload.timestamp.signature: {token}"
    );

    // Inspected under the default TOKEN_FORMAT=v1.
    let (code, object) = inspect(&ns, &[("VERIMAIL_SECRET_KEY", SECRET)], &token).await;
    assert_eq!(code, Some(0));
    assert_eq!(object["status"], "valid");
    assert_eq!(object["format"], "itsdangerous");
    assert_eq!(object["payload"], "alice@example.com");

    // `-` reads the token from stdin (kept out of the process list).
    let mut child = command(
        &ns,
        &[("VERIMAIL_SECRET_KEY", SECRET)],
        &["token", "inspect", "-"],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .spawn()
    .expect("inspect starts");
    let mut stdin = child.stdin.take().expect("stdin");
    tokio::io::AsyncWriteExt::write_all(&mut stdin, format!("{token}\n").as_bytes())
        .await
        .expect("write the token");
    drop(stdin);
    let out = child.wait_with_output().await.expect("inspect ends");
    assert_eq!(out.status.code(), Some(0));
    let object: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(object["format"], "itsdangerous");
}
