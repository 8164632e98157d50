//! The generic HTTP target: signed JSON (the signature checked with openssl,
//! not our code), and its answers decide the outcome.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use serde_json::json;
use verimail_tests::api::{ApiSink, Reply};

use crate::scripted::{CASES, Case, case_of, first_time, scripted};
use crate::support::{Deployment, kind};

/// HMAC-SHA256 of `"{t}.{body}"`, hex, computed here with openssl (not our code).
fn openssl_hmac(secret: &str, t: &str, body: &[u8]) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("openssl")
        .args(["dgst", "-sha256", "-hmac", secret, "-r"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("openssl runs");
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(format!("{t}.").as_bytes());
        let _ = stdin.write_all(body);
    }
    let out = child.wait_with_output().expect("openssl answers");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generic_target_gets_signed_json_and_its_answers_decide_the_outcome() {
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let signatures = Arc::new(Mutex::new(Vec::new()));
    let sigs = signatures.clone();
    let sink = ApiSink::start(move |r| {
        let body = r.json();
        let to = body["to"].as_str().unwrap_or_default().to_owned();
        let address = to
            .rsplit('<')
            .next()
            .unwrap_or_default()
            .trim_end_matches('>')
            .to_owned();
        if let Ok(mut s) = sigs.lock() {
            s.push((
                r.header("verimail-signature")
                    .unwrap_or_default()
                    .to_owned(),
                r.body.clone(),
            ));
        }
        let documented = r.method == "POST"
            && r.path == "/hooks/mail?via=test"
            && body["request_id"]
                .as_str()
                .is_some_and(|v| v.starts_with("http-"))
            && body["from"] == "Verimail <no-reply@verimail.test>"
            && to.contains("Zoé Example")
            && body["subject"].as_str().is_some_and(|s| !s.is_empty())
            && body["text"]
                .as_str()
                .is_some_and(|s| s.contains("/confirm/"))
            && body["html"].as_str().is_some_and(|s| s.contains("href="))
            && body["headers"]["Message-ID"]
                .as_str()
                .is_some_and(|v| v.ends_with("@verimail.test>"));
        if !documented {
            return Reply::json(
                400,
                json!({"error": format!("test: undocumented request {body}")}),
            );
        }
        let first = first_time(&seen, &address);
        scripted(
            case_of(&address),
            first,
            Reply::json(
                200,
                json!({"id": format!("pid-{}", uuid::Uuid::new_v4().simple())}),
            ),
            // The generic target has no recipient answer: a 4xx is the relay's refusal.
            Reply::json(422, json!({"error": "recipient unknown"})),
            Reply::json(422, json!({"error": "refused"})),
            Reply::json(401, json!({"error": "bad signature"})),
        )
    })
    .await
    .expect("the stand-in starts");
    let url = format!("{}/hooks/mail?via=test", sink.base());
    let d = Deployment::start("http", 1, |env| {
        env.set("MAIL_URL", url);
    })
    .await;
    let secret = d
        .env
        .get("VERIMAIL_SECRET_KEY")
        .unwrap_or_default()
        .to_owned();
    for (case, local) in CASES {
        let id = format!("http-{local}");
        d.publish(&id, &format!("{local}@example.com")).await;
        let got = kind(&d.outcome(&id).await);
        let expected = match case {
            Case::Ok | Case::Busy | Case::Flaky => ("sent", ""),
            Case::Recipient | Case::Refuse | Case::Revoked => ("failed", "provider_rejected"),
        };
        assert_eq!((got.0.as_str(), got.1.as_str()), expected, "{case:?}");
    }
    // Every request carries `t=UNIX,v1=HEX`, HMAC-SHA256(secret, "{t}.{body}"), recent.
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let signed = signatures.lock().map(|s| s.clone()).unwrap_or_default();
    assert!(signed.len() >= CASES.len());
    for (header, body) in signed {
        let (t, v1) = header
            .strip_prefix("t=")
            .and_then(|rest| rest.split_once(",v1="))
            .unwrap_or_else(|| panic!("malformed Verimail-Signature: {header}"));
        assert!(
            (now - t.parse::<i64>().unwrap_or(0)).abs() < 120,
            "{header}"
        );
        assert_eq!(v1, openssl_hmac(&secret, t, &body), "{header}");
    }
    d.stop().await;
}
