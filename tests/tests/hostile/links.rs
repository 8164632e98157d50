//! Hostile links at the gateway: forged, tampered, expired, oversized and
//! strange tokens, and hostile headers, each answered 4xx (never 5xx), none
//! confirming anything, while the real link still works.

use std::time::Instant;

use serde_json::{Value, json};
use time::OffsetDateTime;
use verimail_shared::Config;
use verimail_shared::token::{Claims, Signer};
use verimail_tests::env::TestEnv;
use verimail_tests::http;
use verimail_tests::procs::tail;

use crate::WAIT;
use crate::support::{Pipeline, event};

/// A signer for `env`'s secret, or for another one.
fn signer(env: &TestEnv, secret: Option<&str>) -> Signer {
    let mut vars = env.vars.clone();
    if let Some(s) = secret {
        vars.insert("VERIMAIL_SECRET_KEY".into(), s.into());
    }
    let config = Config::from_lookup(|k| vars.get(k).cloned()).expect("test configuration");
    Signer::new(
        &config.keys().expect("a secret is set"),
        config.itsdangerous_digest,
    )
}

fn claims(
    request_id: &str,
    email: &str,
    purpose: &str,
    issued_at: OffsetDateTime,
    ttl: i64,
) -> Claims {
    Claims {
        request_id: request_id.into(),
        user_id: "u-1".into(),
        email: email.into(),
        purpose: purpose.into(),
        locale: None,
        issued_at,
        expires_at: issued_at + time::Duration::seconds(ttl),
    }
}

/// Replaces the character at `i` (from the end when negative) with another
/// URL-safe one.
fn flip(token: &str, i: isize) -> String {
    let mut b = token.as_bytes().to_vec();
    let at = if i < 0 {
        b.len() - i.unsigned_abs()
    } else {
        i.unsigned_abs()
    };
    b[at] = if b[at] == b'A' { b'B' } else { b'A' };
    String::from_utf8(b).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tokens_get_400_never_5xx_and_confirm_nothing() {
    let started = Instant::now();
    let p = Pipeline::start("tokens").await;
    let body = event("real", json!({})).to_string().into_bytes();
    p.publish_raw("h-real", &body).await;
    let mails = p.smtp.wait_for_mails(1, WAIT).await;
    let link = mails
        .first()
        .and_then(|m| m.link.clone())
        .expect("a mail with a link");
    let good = link.rsplit('/').next().unwrap_or_default().to_owned();
    let ours = signer(&p.env, None);
    let theirs = signer(&p.env, Some("another-secret"));
    let now = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or(OffsetDateTime::now_utc());

    let tokens = hostile_tokens(&good, &ours, &theirs, now);
    let base = format!("{}/confirm/", p.env.gateway_url());
    let mut failures = probe_tokens(&base, &tokens).await;
    failures.extend(probe_headers_and_length(&base, &good).await);

    // Nothing was confirmed, no event went out; the real link still works.
    let pool = sqlx::PgPool::connect(p.env.get("DATABASE_URL").unwrap_or_default())
        .await
        .expect("the test reaches its database");
    let confirmations: i64 = sqlx::query_scalar("SELECT count(*) FROM confirmations")
        .fetch_one(&pool)
        .await
        .expect("count");
    let verified_early = p.tap.of_type("verimail.email.verified").len();
    let real = http::post(&link, &[("Accept", "application/json")])
        .await
        .map(|a| a.0)
        .unwrap_or(0);
    let verified = p.tap.wait_for("verimail.email.verified", 1, WAIT).await;
    pool.close().await;
    println!(
        "[hostile] tokens: cases={} confirmations_after_hostile={confirmations} verified_after_hostile={verified_early} real_link={real} total_s={:.1}",
        tokens.len() + 1,
        started.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} wrong answer(s):\n{}\n{}",
        failures.len(),
        failures.join("\n"),
        tail(&p.gateway.log(), 20)
    );
    assert_eq!(
        (confirmations, verified_early),
        (0, 0),
        "a hostile token confirmed something"
    );
    assert_eq!(real, 200, "the real link still confirms");
    assert_eq!(verified.len(), 1, "one verified event, for the real link");
    p.stop().await;
}

/// The hostile tokens: (name, path after /confirm/ as sent on the wire,
/// expected status), around `good`, the token of a real mail.
fn hostile_tokens(
    good: &str,
    ours: &Signer,
    theirs: &Signer,
    now: OffsetDateTime,
) -> Vec<(&'static str, String, u16)> {
    vec![
        ("one_char", "x".into(), 400),
        ("bare_v1", "v1".into(), 400),
        ("only_dots", "v1....".into(), 400),
        ("unknown_kid", "v1.AAAAAAAA.AAAA.AAAA".into(), 400),
        ("flipped_signature", flip(good, -1), 400),
        ("flipped_payload", flip(good, 15), 400),
        ("extra_char", format!("{good}A"), 400),
        ("extra_part", format!("{good}.x"), 400),
        ("truncated", good[..good.len() - 10].to_owned(), 400),
        (
            "other_secret",
            theirs.mint_v1(&claims(
                "h-real",
                "real@example.com",
                "verify_email",
                now,
                3600,
            )),
            400,
        ),
        (
            "unknown_purpose",
            ours.mint_v1(&claims("h-real", "real@example.com", "admin", now, 3600)),
            400,
        ),
        (
            "nul_in_email",
            ours.mint_v1(&claims(
                "h-x",
                "a\u{0}@example.com",
                "verify_email",
                now,
                3600,
            )),
            400,
        ),
        (
            "nul_in_request_id",
            ours.mint_v1(&claims("\u{0}", "a@example.com", "verify_email", now, 3600)),
            400,
        ),
        (
            "crlf_in_email",
            ours.mint_v1(&claims(
                "h-y",
                "a@example.com\r\nX: y",
                "verify_email",
                now,
                3600,
            )),
            400,
        ),
        (
            "oversized_claims",
            ours.mint_v1(&claims(
                &"r".repeat(3500),
                "a@example.com",
                "verify_email",
                now,
                3600,
            )),
            400,
        ),
        (
            "expired",
            ours.mint_v1(&claims(
                "h-old",
                "old@example.com",
                "verify_email",
                now - time::Duration::hours(2),
                3600,
            )),
            410,
        ),
        (
            "itsdangerous_not_accepted",
            ours.mint_itsdangerous("real@example.com", now),
            400,
        ),
        (
            "itsdangerous_shape",
            "ImFAZXhhbXBsZS5jb20i.aGVsbG8.c2lnbmF0dXJl".into(),
            400,
        ),
        ("long_4k", "A".repeat(5000), 400),
        (
            "long_v1",
            format!(
                "v1.{}.{}.{}",
                "A".repeat(8),
                "A".repeat(4000),
                "A".repeat(43)
            ),
            400,
        ),
        ("bad_percent", "%FF%FE".into(), 400),
        ("nul", "%00".into(), 400),
        ("traversal", "..%2F..%2Fetc%2Fpasswd".into(), 400),
        ("script", "%3Cscript%3Ealert(1)%3C%2Fscript%3E".into(), 400),
        ("rtl_override", "v1.%E2%80%AE.x.y".into(), 400),
        ("cyrillic", "%D1%82%D0%BE%D0%BA%D0%B5%D0%BD".into(), 400),
        ("space", "v1.a%20b.c.d".into(), 400),
        ("sql", "v1'%20OR%201%3D1--".into(), 400),
        // Not a token at all: the route does not match.
        ("empty", String::new(), 404),
        ("two_segments", format!("{good}/x"), 404),
    ]
}

/// Each token by GET, POST and HEAD: the expected status and JSON `status`,
/// and an HTML page that never reflects it; returns what was wrong.
async fn probe_tokens(base: &str, tokens: &[(&'static str, String, u16)]) -> Vec<String> {
    let mut failures = Vec::new();
    for (name, path, want) in tokens {
        let url = format!("{base}{path}");
        let mut seen = Vec::new();
        for method in ["GET", "POST", "HEAD"] {
            let answer = http::request(method, &url, &[("Accept", "application/json")]).await;
            match answer {
                Ok((code, _, body)) => {
                    seen.push(code);
                    let json_ok = method == "HEAD"
                        || *want == 404
                        || serde_json::from_str::<Value>(&body).is_ok_and(|v| {
                            v["status"] == if *want == 410 { "expired" } else { "invalid" }
                        });
                    if code != *want || !json_ok {
                        failures.push(format!(
                            "{name} {method}: {code} {}",
                            body.chars().take(120).collect::<String>()
                        ));
                    }
                }
                Err(e) => failures.push(format!("{name} {method}: no answer ({e})")),
            }
        }
        // The HTML page never reflects the token.
        if let Ok((_, _, page)) = http::get(&url, &[]).await
            && (page.contains("<script>alert") || (path.len() > 20 && page.contains(path.as_str())))
        {
            failures.push(format!("{name}: the page reflects the token"));
        }
        println!("[hostile] token {name:<26} {seen:?} (want {want})");
    }
    failures
}

/// Hostile headers around a bad token, and a URL longer than any server
/// should take: never a 5xx; returns what was wrong.
async fn probe_headers_and_length(base: &str, good: &str) -> Vec<String> {
    let mut failures = Vec::new();
    // Hostile headers around a bad and a good token: never a 5xx.
    let junk_language = "zz-ZZZZZZZZZZ;q=abc, ".repeat(400);
    let headers: [(&str, &str); 5] = [
        ("Accept-Language", junk_language.as_str()),
        ("Accept-Language", "*;q=NaN, ;;, -"),
        ("X-Forwarded-For", "not-an-ip, 999.1.1.1, ::::"),
        ("Accept", "application/json;q=0, text/html;q=abc, */*"),
        ("Content-Type", "application/json"),
    ];
    for (name, value) in headers {
        let bad = http::get(&format!("{base}{}", flip(good, -1)), &[(name, value)]).await;
        let code = bad.as_ref().map(|a| a.0).unwrap_or(0);
        println!("[hostile] header {name:<25} bad token: {code}");
        if code != 400 {
            failures.push(format!("header {name} with a bad token: {code}"));
        }
    }
    // A URL longer than any server should take: refused, not a 5xx.
    let huge = http::get(&format!("{base}{}", "A".repeat(64 * 1024)), &[]).await;
    let huge_code = huge.as_ref().map(|a| a.0).unwrap_or(0);
    println!(
        "[hostile] token {:<26} {huge_code} (want 4xx or a closed connection)",
        "url_64k"
    );
    if huge_code >= 500 {
        failures.push(format!("url_64k: {huge_code}"));
    }
    failures
}
