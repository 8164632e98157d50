//! No path, token, method or header makes the router answer 5xx (with a real database).

mod common;

use axum::body::Body;
use axum::http::Request;
use common::*;
use proptest::prelude::*;
use verimail_shared::token::Claims;

fn percent_encode(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A valid token with one byte changed, truncated or extended.
fn mutate(token: &str, at: usize, byte: u8, mode: u8) -> String {
    let mut bytes = token.as_bytes().to_vec();
    let at = at % bytes.len().max(1);
    match mode % 3 {
        0 => bytes[at] = byte,
        1 => bytes.truncate(at),
        _ => bytes.insert(at, byte),
    }
    percent_encode(&bytes)
}

#[test]
fn no_input_makes_the_router_answer_5xx() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let app = rt.block_on(TestApp::new(&[("ACCEPT_ITSDANGEROUS", "true")]));
    let now = time::OffsetDateTime::now_utc();
    let valid = app.state.signer().mint_v1(&Claims {
        request_id: "prop".into(),
        user_id: "u".into(),
        email: "prop@example.com".into(),
        purpose: "reset_password".into(),
        locale: Some("zh-CN".into()),
        issued_at: now,
        expires_at: now + time::Duration::hours(1),
    });
    let legacy = app
        .state
        .signer()
        .mint_itsdangerous("prop@example.com", now);

    let methods = prop::sample::select(vec!["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS"]);
    let path = prop_oneof![
        // Anything printable after /confirm/.
        prop::collection::vec(any::<u8>(), 0..300)
            .prop_map(|b| format!("/confirm/{}", percent_encode(&b))),
        // Raw URI characters (invalid ones are skipped below).
        "[ -~]{0,200}".prop_map(|s| format!("/{s}")),
        // Near-valid tokens of both formats.
        (any::<usize>(), any::<u8>(), any::<u8>()).prop_map({
            let valid = valid.clone();
            move |(at, byte, mode)| format!("/confirm/{}", mutate(&valid, at, byte, mode))
        }),
        (any::<usize>(), any::<u8>(), any::<u8>()).prop_map({
            let legacy = legacy.clone();
            move |(at, byte, mode)| format!("/confirm/{}", mutate(&legacy, at, byte, mode))
        }),
    ];
    let headers = prop::collection::vec(
        (
            prop::sample::select(vec![
                "accept",
                "accept-language",
                "x-forwarded-for",
                "content-type",
            ]),
            "[ -~]{0,80}",
        ),
        0..4,
    );

    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 400,
        ..ProptestConfig::default()
    });
    let result = runner.run(&(methods, path, headers), |(method, path, headers)| {
        let mut builder = Request::builder().method(method).uri(path.as_str());
        for (name, value) in &headers {
            builder = builder.header(*name, value.as_str());
        }
        // Strings the HTTP types refuse never reach a server either.
        let Ok(req) = builder.body(Body::from("x=1")) else {
            return Ok(());
        };
        let answer = rt.block_on(app.call(req));
        prop_assert!(
            !answer.status.is_server_error(),
            "{method} {path} {headers:?} → {}",
            answer.status
        );
        Ok(())
    });
    rt.block_on(app.cleanup());
    if let Err(e) = result {
        panic!("{e}");
    }
}
