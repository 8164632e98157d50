//! The operational side: `/healthz`, `/readyz` and `/metrics` on their own
//! router only, and a database that is closed or hung answered 503 within
//! 5 seconds.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use time::OffsetDateTime;
use verimail_gateway::{AppState, BusSlot};

use crate::common::*;

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
