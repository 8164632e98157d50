//! The whole gateway over TCP (`Gateway::build`, `run`, stop) started while
//! the broker is unreachable: clicks are answered, the outbox keeps the event,
//! and once the broker is back the relay sends the very same id.

use std::net::SocketAddr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use verimail_gateway::Gateway;

use crate::common::*;
use crate::{Subscriber, connect};

/// One request through the tests' HTTP client: (status, body).
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let url = format!("http://{addr}{path}");
    let (status, _, body) = verimail_tests::http::request(method, &url, headers)
        .await
        .expect("an HTTP answer");
    (status, body)
}

#[tokio::test]
async fn the_outbox_survives_a_broker_outage_and_sends_the_same_id() {
    // The gateway starts with the broker unreachable (a closed port).
    let (config, db_name, namespace) =
        config(&[("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")]);
    let gateway = Gateway::build(config)
        .await
        .expect("the gateway starts without a broker");
    let addr = gateway.local_addr();
    let ops = gateway.metrics_addr();
    assert_ne!(addr.port(), 0);
    assert_ne!(ops.port(), 0);
    assert_ne!(ops, addr);
    let state = gateway.state().clone();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(gateway.run(shutdown.clone()));

    let now = time::OffsetDateTime::now_utc();
    let token = state.signer().mint_v1(&claims(
        "o1",
        "verify_email",
        None,
        now,
        now + time::Duration::hours(1),
    ));
    let (status, body) = http(
        addr,
        "GET",
        &format!("/confirm/{token}"),
        &[("accept", "application/json")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"verified\""));
    let (status, body) = http(ops, "GET", "/readyz", &[]).await;
    assert_eq!(status, 503);
    assert!(body.contains("\"broker\":\"unreachable\""), "{body}");
    let (status, _) = http(ops, "GET", "/healthz", &[]).await;
    assert_eq!(status, 200);
    let (status, body) = http(ops, "GET", "/metrics", &[]).await;
    assert_eq!(status, 200);
    assert!(
        body.contains("verimail_gateway_confirm_requests_total"),
        "{body}"
    );
    // The public listener serves /confirm only.
    for path in ["/readyz", "/healthz", "/metrics"] {
        assert_eq!(http(addr, "GET", path, &[]).await.0, 404, "{path}");
    }
    let pending: Vec<String> = sqlx::query_scalar("SELECT id FROM outbox")
        .fetch_all(state.pool())
        .await
        .expect("outbox");
    assert_eq!(pending.len(), 1);

    // The broker is back: the relay sends the very same event id.
    let sub = Subscriber::new(&namespace).await;
    let bus = connect("gateway-back").await;
    state.bus().set(bus);
    let got = sub
        .next(Duration::from_secs(10))
        .await
        .expect("the event goes out");
    assert_eq!(got.message_id, pending[0]);
    assert_eq!(got.event_id, pending[0]);
    let (status, _) = http(ops, "GET", "/readyz", &[]).await;
    assert_eq!(status, 200);
    let pool = state.pool().clone();
    assert!(
        eventually(Duration::from_secs(5), || {
            let pool = pool.clone();
            async move {
                sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox")
                    .fetch_one(&pool)
                    .await
                    .is_ok_and(|n| n == 0)
            }
        })
        .await
    );

    // A clean stop: run returns Ok, promptly.
    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("stops within 10 s")
        .expect("the task did not panic");
    assert!(stopped.is_ok(), "{stopped:?}");
    for a in [addr, ops] {
        assert!(
            tokio::net::TcpStream::connect(a).await.is_err(),
            "{a} no longer listening"
        );
    }
    sub.cleanup().await;
    drop(state);
    drop_database(&db_name).await;
}
