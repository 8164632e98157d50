//! Every row of the contract's HTTP table, through the router with `oneshot`,
//! each test on its own PostgreSQL database.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use common::*;
use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use time::OffsetDateTime;
use verimail_gateway::{AppState, BusSlot};
use verimail_shared::events::{EMAIL_VERIFIED, Event};
use verimail_shared::token::{ProofPayload, TokenError};

fn confirmations_key_event(rows: &[(String, String)], key: &str) -> Option<String> {
    rows.iter().find(|(k, _)| k == key).map(|(_, e)| e.clone())
}

async fn confirmations(app: &TestApp) -> Vec<(String, String)> {
    sqlx::query_as("SELECT key, event_id FROM confirmations ORDER BY key")
        .fetch_all(app.pool())
        .await
        .expect("read confirmations")
}

#[tokio::test]
async fn a_verify_email_link_confirms_with_a_page_and_one_outbox_event() {
    let app = TestApp::new(&[]).await;
    app.insert_request(
        "r1",
        "r1@example.com",
        "verify_email",
        None,
        Some(json!({"flow": "b"})),
        Duration::from_secs(5),
    )
    .await;
    let token = app.token("r1", "verify_email");

    let answer = app.get(&format!("/confirm/{token}")).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(answer.header("content-type").starts_with("text/html"));
    assert!(answer.body.contains("Address confirmed"), "{}", answer.body);
    assert!(answer.body.contains("r1@example.com"));

    let outbox = app.outbox().await;
    assert_eq!(outbox.len(), 1);
    let (id, event) = &outbox[0];
    let confirmations = confirmations(&app).await;
    assert_eq!(
        confirmations_key_event(&confirmations, "r:r1").as_ref(),
        Some(id)
    );
    assert_eq!(event["id"], json!(id));
    assert_eq!(event["type"], EMAIL_VERIFIED);
    assert_eq!(event["source"], "/verimail/gateway");
    assert_eq!(event["specversion"], "1.0");
    assert_eq!(event["datacontenttype"], "application/json");
    assert_eq!(event["data"]["request_id"], "r1");
    assert_eq!(event["data"]["user_id"], "user-r1");
    assert_eq!(event["data"]["email"], "r1@example.com");
    assert_eq!(event["data"]["purpose"], "verify_email");
    assert_eq!(event["data"]["context"], json!({"flow": "b"}));
    assert!(
        event["data"]["verified_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    // The id is a UUIDv7 and the event decodes with the shared types.
    assert_eq!(
        uuid::Uuid::parse_str(id).map(|u| u.get_version_num()).ok(),
        Some(7)
    );
    let bytes = serde_json::to_vec(event).expect("re-encode");
    assert!(matches!(Event::decode(&bytes), Ok(Event::Verified(_))));
    app.cleanup().await;
}

#[tokio::test]
async fn json_clients_get_the_status_user_and_email() {
    let app = TestApp::new(&[]).await;
    let token = app.token("r2", "verify_email");
    let answer = app.get_json(&format!("/confirm/{token}")).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("content-type"), "application/json");
    assert_eq!(
        answer.json(),
        json!({"status": "verified", "user_id": "user-r2", "email": "r2@example.com"})
    );
    // Unknown request row: the event's context is null.
    let outbox = app.outbox().await;
    assert_eq!(outbox[0].1["data"]["context"], serde_json::Value::Null);

    let again = app.get_json(&format!("/confirm/{token}")).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.json()["status"], "already_verified");
    app.cleanup().await;
}

#[tokio::test]
async fn an_allowlisted_return_url_gets_a_303_with_verimail_verified() {
    let app = TestApp::new(&[]).await;
    app.insert_request(
        "r3",
        "r3@example.com",
        "verify_email",
        Some("https://app.example.com/welcome?step=2"),
        None,
        Duration::ZERO,
    )
    .await;
    let token = app.token("r3", "verify_email");
    let answer = app.get(&format!("/confirm/{token}")).await;
    assert_eq!(answer.status, 303);
    assert_eq!(
        answer.header("location"),
        "https://app.example.com/welcome?step=2&verimail=verified"
    );
    // Second click: the same redirect says already_verified; JSON keeps the 303.
    let again = app.get_json(&format!("/confirm/{token}")).await;
    assert_eq!(again.status, 303);
    assert_eq!(
        again.header("location"),
        "https://app.example.com/welcome?step=2&verimail=already_verified"
    );
    assert_eq!(again.json()["status"], "already_verified");
    assert_eq!(again.json()["redirect"], again.header("location"));
    assert_eq!(app.outbox().await.len(), 1);
    app.cleanup().await;
}

#[tokio::test]
async fn a_return_url_no_longer_allowlisted_gets_the_page_not_a_redirect() {
    let app = TestApp::new(&[]).await;
    app.insert_request(
        "r4",
        "r4@example.com",
        "verify_email",
        Some("https://old.example.com/welcome"),
        None,
        Duration::ZERO,
    )
    .await;
    let answer = app
        .get(&format!("/confirm/{}", app.token("r4", "verify_email")))
        .await;
    assert_eq!(answer.status, 200);
    assert!(answer.headers.get("location").is_none());
    assert!(answer.body.contains("Address confirmed"));
    app.cleanup().await;
}

#[tokio::test]
async fn a_second_click_is_already_verified_without_a_second_event() {
    let app = TestApp::new(&[]).await;
    let path = format!("/confirm/{}", app.token("r5", "verify_email"));
    assert_eq!(app.get(&path).await.status, 200);
    let again = app.get(&path).await;
    assert_eq!(again.status, 200);
    assert!(again.body.contains("Already confirmed"), "{}", again.body);
    // POST confirms too, with the same answer.
    let post = app.post(&path).await;
    assert_eq!(post.status, 200);
    assert!(post.body.contains("Already confirmed"));
    assert_eq!(app.outbox().await.len(), 1);
    assert_eq!(confirmations(&app).await.len(), 1);
    app.cleanup().await;
}

#[tokio::test]
async fn concurrent_clicks_record_one_confirmation_and_one_event() {
    let app = TestApp::new(&[]).await;
    let path = format!("/confirm/{}", app.token("r6", "verify_email"));
    let answers = futures_util::future::join_all((0..8).map(|_| app.get_json(&path))).await;
    let verified = answers
        .iter()
        .filter(|a| a.json()["status"] == "verified")
        .count();
    let already = answers
        .iter()
        .filter(|a| a.json()["status"] == "already_verified")
        .count();
    assert_eq!((verified, already), (1, 7));
    assert_eq!(app.outbox().await.len(), 1);
    app.cleanup().await;
}

#[tokio::test]
async fn a_reset_password_get_shows_a_post_form_and_spends_nothing() {
    let app = TestApp::new(&[]).await;
    app.insert_request(
        "p1",
        "p1@example.com",
        "reset_password",
        Some("https://app.example.com/reset"),
        None,
        Duration::ZERO,
    )
    .await;
    let path = format!("/confirm/{}", app.token("p1", "reset_password"));
    let page = app.get(&path).await;
    assert_eq!(page.status, 200);
    assert!(
        page.body.contains("<form method=\"post\">"),
        "{}",
        page.body
    );
    assert!(page.body.contains("<button type=\"submit\">"));
    assert!(!page.body.contains("verimail_proof"));
    let json = app.get_json(&path).await;
    assert_eq!(json.status, 200);
    assert_eq!(
        json.json(),
        json!({"status": "confirm_required", "user_id": "user-p1", "email": "p1@example.com"})
    );
    // HEAD (link checkers) spends nothing either.
    let head = app.call(request("HEAD", &path, &[])).await;
    assert_eq!(head.status, 200);
    assert!(app.outbox().await.is_empty());
    assert!(confirmations(&app).await.is_empty());
    app.cleanup().await;
}

#[tokio::test]
async fn a_reset_password_post_redirects_with_a_proof_then_is_used() {
    let app = TestApp::new(&[]).await;
    app.insert_request(
        "p2",
        "p2@example.com",
        "reset_password",
        Some("https://app.example.com/reset?lang=en"),
        None,
        Duration::ZERO,
    )
    .await;
    let path = format!("/confirm/{}", app.token("p2", "reset_password"));
    let answer = app.post(&path).await;
    assert_eq!(answer.status, 303, "{}", answer.body);
    let location = url::Url::parse(answer.header("location")).expect("an absolute URL");
    assert_eq!(location.origin().ascii_serialization(), ALLOWED);
    assert_eq!(location.path(), "/reset");
    let params: Vec<(String, String)> = location.query_pairs().into_owned().collect();
    assert_eq!(params[0], ("lang".into(), "en".into()));
    assert_eq!(params[1], ("verimail".into(), "verified".into()));
    assert_eq!(params[2].0, "verimail_proof");
    let proof = app
        .state
        .signer()
        .verify_proof(&params[2].1, OffsetDateTime::now_utc())
        .expect("the proof verifies");
    assert_eq!(
        proof,
        ProofPayload {
            request_id: Some("p2".into()),
            user_id: Some("user-p2".into()),
            email: "p2@example.com".into(),
            purpose: "reset_password".into(),
        }
    );
    // Valid 900 s, not one more.
    let later = OffsetDateTime::now_utc() + time::Duration::seconds(901);
    assert!(matches!(
        app.state.signer().verify_proof(&params[2].1, later),
        Err(TokenError::Expired(_))
    ));
    let outbox = app.outbox().await;
    assert_eq!(outbox.len(), 1);
    assert_eq!(outbox[0].1["data"]["purpose"], "reset_password");

    for answer in [app.post(&path).await, app.get(&path).await] {
        assert_eq!(answer.status, 410);
        assert!(answer.body.contains("already used"), "{}", answer.body);
        assert!(!answer.body.contains("verimail_proof"));
        assert!(answer.headers.get("location").is_none());
    }
    let json = app
        .call(request("POST", &path, &[("accept", "application/json")]))
        .await;
    assert_eq!(json.status, 410);
    assert_eq!(json.json()["status"], "used");
    assert_eq!(app.outbox().await.len(), 1);
    app.cleanup().await;
}

#[tokio::test]
async fn a_reset_password_without_an_allowed_return_url_shows_a_page_without_proof() {
    let app = TestApp::new(&[]).await;
    app.insert_request(
        "p3",
        "p3@example.com",
        "reset_password",
        Some("https://gone.example.com/reset"),
        None,
        Duration::ZERO,
    )
    .await;
    let answer = app
        .post(&format!("/confirm/{}", app.token("p3", "reset_password")))
        .await;
    assert_eq!(answer.status, 200);
    assert!(answer.body.contains("Address confirmed"));
    assert!(!answer.body.contains("proof"));
    assert_eq!(app.outbox().await.len(), 1);
    app.cleanup().await;
}

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

/// A TCP server that accepts connections and never answers: a hung database.
async fn black_hole() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    addr
}

async fn state_on(url: &str) -> AppState {
    let (config, _, _) = config(&[]);
    let pool = PgPoolOptions::new()
        .acquire_timeout(verimail_gateway::ACQUIRE_TIMEOUT)
        .connect_lazy(url)
        .expect("a parsable URL");
    AppState::new(&config, pool, BusSlot::empty()).expect("keys")
}

#[tokio::test]
async fn an_unreachable_database_answers_503_within_5_seconds() {
    let closed = "postgres://postgres@127.0.0.1:1/none";
    let hung = format!("postgres://postgres@{}/none", black_hole().await);
    for url in [closed, hung.as_str()] {
        let state = state_on(url).await;
        let now = OffsetDateTime::now_utc();
        let token = state.signer().mint_v1(&claims(
            "d1",
            "verify_email",
            None,
            now,
            now + time::Duration::hours(1),
        ));
        let reset = state.signer().mint_v1(&claims(
            "d2",
            "reset_password",
            None,
            now,
            now + time::Duration::hours(1),
        ));
        for (method, token, json) in [
            ("GET", &token, true),
            ("GET", &token, false),
            ("GET", &reset, true),
            ("POST", &reset, true),
        ] {
            let started = Instant::now();
            let headers: &[(&str, &str)] = if json {
                &[("accept", "application/json")]
            } else {
                &[]
            };
            let answer = call(
                &state,
                request(method, &format!("/confirm/{token}"), headers),
            )
            .await;
            let took = started.elapsed();
            assert_eq!(answer.status, 503, "{url} {method}");
            assert!(took < Duration::from_secs(5), "{url}: {took:?}");
            if json {
                assert_eq!(
                    answer.json(),
                    json!({"status": "unavailable", "user_id": null, "email": null})
                );
            } else {
                assert!(answer.body.contains("Temporarily unavailable"));
            }
        }
        // Invalid tokens never reach the database: still 400.
        assert_eq!(
            call(&state, request("GET", "/confirm/garbage", &[]))
                .await
                .status,
            400
        );
        let ready = ops_call(&state, request("GET", "/readyz", &[])).await;
        assert_eq!(ready.status, 503);
        assert_eq!(ready.json()["database"], "unreachable");
    }
}

#[tokio::test]
async fn healthz_readyz_and_metrics_answer_on_the_operational_router_only() {
    let app = TestApp::new(&[]).await;
    // Not beside /confirm: visitors reach neither the probes nor the metrics.
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(app.get(path).await.status, 404, "{path} is public");
    }
    let health = app.ops_get("/healthz").await;
    assert_eq!(health.status, 200);
    // No broker connected yet: not ready, and says why.
    let ready = app.ops_get("/readyz").await;
    assert_eq!(ready.status, 503);
    assert_eq!(
        ready.json(),
        json!({"database": "ok", "broker": "unreachable"})
    );

    let bus = verimail_shared::bus::Bus::connect_once(&app.config.amqp_urls, "gateway-test")
        .await
        .expect("RabbitMQ runs locally");
    app.state.bus().set(bus.clone());
    let ready = app.ops_get("/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.body);

    let _ = app
        .get(&format!("/confirm/{}", app.token("m1", "verify_email")))
        .await;
    let _ = app.get("/confirm/garbage").await;
    let metrics = app.ops_get("/metrics").await;
    assert_eq!(metrics.status, 200);
    assert!(metrics.header("content-type").starts_with("text/plain"));
    for line in [
        "verimail_gateway_confirm_requests_total{status=\"verified\"} 1",
        "verimail_gateway_confirm_requests_total{status=\"invalid\"} 1",
        "verimail_gateway_confirm_duration_seconds_bucket",
        "verimail_gateway_outbox_backlog",
    ] {
        assert!(
            metrics.body.contains(line),
            "{line} missing from\n{}",
            metrics.body
        );
    }
    bus.close().await;
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

/// The first vector of shared/tests/vectors/itsdangerous.json (made by Python's itsdangerous).
const VECTOR_SECRET: &str = "correct horse battery staple";
const VECTOR_TOKEN: &str = "ImFsaWNlQGV4YW1wbGUuY29tIg.aSSBAA.BmRDExBJP8ylV0Oi6-akHMdAL90";

fn legacy_vars() -> [(&'static str, &'static str); 4] {
    [
        ("VERIMAIL_SECRET_KEY", VECTOR_SECRET),
        ("ACCEPT_ITSDANGEROUS", "true"),
        // The vector was signed on 2025-11-24: a TTL of ten years keeps it valid.
        ("TOKEN_TTL_SECONDS", "315360000"),
        ("RETENTION_HOURS", "100000"),
    ]
}

#[tokio::test]
async fn a_legacy_token_for_an_unknown_address_confirms_with_nulls() {
    let app = TestApp::new(&legacy_vars()).await;
    let answer = app.get_json(&format!("/confirm/{VECTOR_TOKEN}")).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        answer.json(),
        json!({"status": "verified", "user_id": null, "email": "alice@example.com"})
    );
    let outbox = app.outbox().await;
    assert_eq!(outbox.len(), 1);
    let data = &outbox[0].1["data"];
    assert_eq!(data["request_id"], serde_json::Value::Null);
    assert_eq!(data["user_id"], serde_json::Value::Null);
    assert_eq!(data["context"], serde_json::Value::Null);
    assert_eq!(data["email"], "alice@example.com");
    assert_eq!(data["purpose"], "verify_email");
    let keys = confirmations(&app).await;
    assert_eq!(keys[0].0, "e:alice@example.com");
    app.cleanup().await;
}

#[tokio::test]
async fn a_legacy_token_takes_ids_and_context_from_the_latest_mail() {
    let app = TestApp::new(&legacy_vars()).await;
    app.insert_request(
        "old",
        "alice@example.com",
        "verify_email",
        None,
        Some(json!({"n": 1})),
        Duration::from_secs(600),
    )
    .await;
    app.insert_request(
        "new",
        "alice@example.com",
        "verify_email",
        Some("https://app.example.com/hi"),
        Some(json!({"n": 2})),
        Duration::from_secs(60),
    )
    .await;
    app.insert_request(
        "other",
        "bob@example.com",
        "verify_email",
        None,
        None,
        Duration::ZERO,
    )
    .await;
    let answer = app.get(&format!("/confirm/{VECTOR_TOKEN}")).await;
    assert_eq!(answer.status, 303);
    assert_eq!(
        answer.header("location"),
        "https://app.example.com/hi?verimail=verified"
    );
    let outbox = app.outbox().await;
    let data = &outbox[0].1["data"];
    assert_eq!(data["request_id"], "new");
    assert_eq!(data["user_id"], "user-new");
    assert_eq!(data["context"], json!({"n": 2}));

    // A fresh legacy token for the same address is already verified.
    let fresh = app
        .state
        .signer()
        .mint_itsdangerous("alice@example.com", OffsetDateTime::now_utc());
    let again = app.get_json(&format!("/confirm/{fresh}")).await;
    assert_eq!(again.status, 303);
    assert_eq!(again.json()["status"], "already_verified");
    assert_eq!(again.json()["user_id"], "user-new");
    assert_eq!(app.outbox().await.len(), 1);
    app.cleanup().await;
}

#[tokio::test]
async fn an_expired_legacy_token_is_410() {
    let app = TestApp::new(&[
        ("VERIMAIL_SECRET_KEY", VECTOR_SECRET),
        ("ACCEPT_ITSDANGEROUS", "true"),
    ])
    .await;
    let answer = app.get(&format!("/confirm/{VECTOR_TOKEN}")).await;
    assert_eq!(answer.status, 410);
    app.cleanup().await;
}

#[tokio::test]
async fn a_click_whose_batch_began_gets_its_proof_even_past_the_deadline() {
    use sqlx::Connection;
    use verimail_gateway::routes::confirm::DB_DEADLINE;

    let app = TestApp::new(&[]).await;
    app.insert_request(
        "h1",
        "h1@example.com",
        "reset_password",
        Some("https://app.example.com/reset"),
        None,
        Duration::ZERO,
    )
    .await;
    // The production statement timeout (3 s) would end a batch held this
    // long; a longer one lets the test hold a begun batch past the 4 s
    // deadline, which in production happens to a click that waited in the
    // queue before its batch began.
    let url = format!("{PG}/{}", app.db_name);
    let options: sqlx::postgres::PgConnectOptions = url.parse().expect("a URL");
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options.options([("statement_timeout", "20000")]))
        .await
        .expect("a pool");
    let state = AppState::new(&app.config, pool, BusSlot::empty()).expect("keys");

    // A test connection holds the table: the batch begins, then waits.
    let mut holder = sqlx::PgConnection::connect(&url).await.expect("connect");
    sqlx::raw_sql("BEGIN; LOCK TABLE confirmations IN SHARE MODE")
        .execute(&mut holder)
        .await
        .expect("lock");
    let release = tokio::spawn(async move {
        tokio::time::sleep(DB_DEADLINE + Duration::from_secs(1)).await;
        sqlx::raw_sql("COMMIT")
            .execute(&mut holder)
            .await
            .expect("unlock");
        holder
    });

    let path = format!("/confirm/{}", app.token("h1", "reset_password"));
    let started = Instant::now();
    let answer = call(&state, request("POST", &path, &[])).await;
    let took = started.elapsed();
    assert!(
        took > DB_DEADLINE,
        "the batch was held past the deadline: {took:?}"
    );
    assert_eq!(answer.status, 303, "{}", answer.body);
    let location = url::Url::parse(answer.header("location")).expect("an absolute URL");
    let proof = location
        .query_pairs()
        .find(|(k, _)| k == "verimail_proof")
        .map(|(_, v)| v.into_owned())
        .expect("the redirect carries the proof");
    assert!(
        state
            .signer()
            .verify_proof(&proof, OffsetDateTime::now_utc())
            .is_ok()
    );
    // Single-use still: the second click is 410 `used`.
    let again = call(&state, request("POST", &path, &[])).await;
    assert_eq!(again.status, 410, "{}", again.body);
    assert_eq!(app.outbox().await.len(), 1);

    let holder = release.await.expect("the holder");
    let _ = holder.close().await;
    state.pool().close().await;
    app.cleanup().await;
}

#[tokio::test]
async fn by_default_a_get_never_confirms_and_the_button_post_does() {
    let app = TestApp::new(&[("CONFIRM_ON_GET", "false"), ("ACCEPT_ITSDANGEROUS", "true")]).await;
    app.insert_request(
        "g1",
        "g1@example.com",
        "verify_email",
        None,
        None,
        Duration::ZERO,
    )
    .await;
    let path = format!("/confirm/{}", app.token("g1", "verify_email"));
    // A mail scanner's GET, twice: the button page, nothing recorded.
    for _ in 0..2 {
        let json = app.get_json(&path).await;
        assert_eq!(json.status, 200, "{}", json.body);
        assert_eq!(json.json()["status"], "confirm_required");
        let page = app.get(&path).await;
        assert_eq!(page.status, 200);
        assert!(page.body.contains("<form"), "{}", page.body);
        assert!(page.body.contains("method=\"post\"") || page.body.contains("method=post"));
        assert!(!page.body.contains("works only once"), "{}", page.body);
    }
    let legacy = app
        .state
        .signer()
        .mint_itsdangerous("g1@example.com", OffsetDateTime::now_utc());
    let json = app.get_json(&format!("/confirm/{legacy}")).await;
    assert_eq!(json.json()["status"], "confirm_required");
    assert!(confirmations(&app).await.is_empty());
    assert!(app.outbox().await.is_empty());

    // The button's POST confirms, once.
    let answer = app
        .call(request("POST", &path, &[("accept", "application/json")]))
        .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.json()["status"], "verified");
    assert_eq!(app.outbox().await.len(), 1);
    let again = app.get_json(&path).await;
    assert_eq!(again.json()["status"], "already_verified");
    let again = app
        .call(request("POST", &path, &[("accept", "application/json")]))
        .await;
    assert_eq!(again.json()["status"], "already_verified");
    assert_eq!(app.outbox().await.len(), 1);
    app.cleanup().await;
}
