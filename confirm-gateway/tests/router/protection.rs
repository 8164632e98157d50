//! What protects `/confirm`: the per-client rate limit (429 with
//! `Retry-After`), `X-Forwarded-For` believed only from trusted proxies, and
//! the security headers on every answer.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ConnectInfo;

use crate::common::*;

fn from(
    req: axum::http::Request<axum::body::Body>,
    peer: &str,
) -> axum::http::Request<axum::body::Body> {
    let mut req = req;
    let addr: SocketAddr = peer.parse().expect("a socket address");
    req.extensions_mut().insert(ConnectInfo(addr));
    req
}

#[tokio::test]
async fn over_the_rate_limit_answers_429_with_retry_after() {
    let app = TestApp::new(&[("CONFIRM_RATE_LIMIT_PER_MINUTE", "3")]).await;
    let path = "/confirm/garbage";
    for _ in 0..3 {
        let answer = app
            .call(from(request("GET", path, &[]), "203.0.113.7:5000"))
            .await;
        assert_eq!(answer.status, 400);
    }
    let limited = app
        .call(from(
            request("GET", path, &[("accept", "application/json")]),
            "203.0.113.7:5001",
        ))
        .await;
    assert_eq!(limited.status, 429);
    // 3 per minute: the next token in 20 s (give or take the time the calls took).
    let retry: u64 = limited
        .header("retry-after")
        .parse()
        .expect("whole seconds");
    assert!((19..=20).contains(&retry), "{retry}");
    assert_eq!(limited.json()["status"], "rate_limited");
    let page = app
        .call(from(request("GET", path, &[]), "203.0.113.7:5002"))
        .await;
    assert_eq!(page.status, 429);
    assert!(page.body.contains("Too many attempts"));
    // Another client is not limited.
    let other = app
        .call(from(request("GET", path, &[]), "203.0.113.8:5000"))
        .await;
    assert_eq!(other.status, 400);
    app.cleanup().await;
}

#[tokio::test]
async fn x_forwarded_for_counts_only_from_trusted_proxies() {
    let app = TestApp::new(&[
        ("CONFIRM_RATE_LIMIT_PER_MINUTE", "1"),
        ("TRUSTED_PROXIES", "10.0.0.0/8"),
    ])
    .await;
    let path = "/confirm/garbage";
    let via_proxy = |client: &str| {
        from(
            request("GET", path, &[("x-forwarded-for", client)]),
            "10.1.2.3:443",
        )
    };
    // Behind the trusted proxy, two clients have a bucket each.
    assert_eq!(app.call(via_proxy("198.51.100.1")).await.status, 400);
    assert_eq!(app.call(via_proxy("198.51.100.2")).await.status, 400);
    assert_eq!(app.call(via_proxy("198.51.100.1")).await.status, 429);
    // A spoofed left-most entry does not escape the limit.
    assert_eq!(
        app.call(via_proxy("1.1.1.1, 198.51.100.1")).await.status,
        429
    );
    // From an untrusted peer, the header is ignored: the peer is the client.
    let direct = |client: &str| {
        from(
            request("GET", path, &[("x-forwarded-for", client)]),
            "192.0.2.9:1234",
        )
    };
    assert_eq!(app.call(direct("198.51.100.3")).await.status, 400);
    assert_eq!(app.call(direct("198.51.100.4")).await.status, 429);
    app.cleanup().await;
}

#[tokio::test]
async fn every_confirm_answer_carries_the_security_headers() {
    let app = TestApp::new(&[("CONFIRM_RATE_LIMIT_PER_MINUTE", "8")]).await;
    app.insert_request(
        "s1",
        "s1@example.com",
        "verify_email",
        Some("https://app.example.com/x"),
        None,
        Duration::ZERO,
    )
    .await;
    let verify = app.token("s1", "verify_email");
    let reset = app.token("s2", "reset_password");
    let expired = app.expired_token("s3", None);
    let paths = [
        ("GET", format!("/confirm/{verify}")),  // 303
        ("GET", format!("/confirm/{verify}")),  // 303 already
        ("GET", format!("/confirm/{reset}")),   // confirm_required
        ("POST", format!("/confirm/{reset}")),  // verified page (no row)
        ("POST", format!("/confirm/{reset}")),  // 410 used
        ("GET", format!("/confirm/{expired}")), // 410 expired
        ("GET", "/confirm/garbage".to_owned()), // 400
        ("GET", "/confirm/garbage".to_owned()), // 400 (8th request)
        ("GET", "/confirm/garbage".to_owned()), // 429
    ];
    let mut codes = Vec::new();
    for (method, path) in &paths {
        let answer = app.call(request(method, path, &[])).await;
        codes.push(answer.status.as_u16());
        assert_eq!(answer.header("referrer-policy"), "no-referrer");
        assert_eq!(answer.header("cache-control"), "no-store");
        assert_eq!(answer.header("x-content-type-options"), "nosniff");
        let csp = answer.header("content-security-policy");
        assert!(
            csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"),
            "{csp}"
        );
        // Browsers check the redirect that answers a form POST against form-action.
        assert!(
            csp.contains("form-action 'self' https://app.example.com;"),
            "{csp}"
        );
    }
    assert_eq!(codes, [303, 303, 200, 200, 410, 410, 400, 400, 429]);
    app.cleanup().await;
}
