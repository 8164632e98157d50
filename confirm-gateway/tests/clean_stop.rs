//! The `verimail-gateway` binary stops cleanly: after it has published an
//! event, SIGTERM ends it with exit 0 and not one ERROR line on stderr.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use verimail_shared::bus::{Bus, Topology};

const BIN: &str = env!("CARGO_BIN_EXE_verimail-gateway");

/// `METHOD path` through the tests' HTTP client: the status code, or `None`
/// when nothing answers.
async fn status_of(method: &str, addr: &str, path: &str) -> Option<u16> {
    let url = format!("http://{addr}{path}");
    verimail_tests::http::request(method, &url, &[])
        .await
        .ok()
        .map(|(status, _, _)| status)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[tokio::test]
async fn sigterm_after_a_published_event_stops_with_exit_0_and_no_error_line() -> TestResult {
    // The database (migrated) and a request to confirm, as the worker leaves them.
    let app = TestApp::new(&[]).await;
    let request_id = format!("req-{}", uuid::Uuid::new_v4().simple());
    app.insert_request(
        &request_id,
        "alice@example.com",
        "verify_email",
        None,
        None,
        Duration::ZERO,
    )
    .await;
    let token = app.token(&request_id, "verify_email");

    // A queue for the verified event, so the gateway's publish is routed and seen.
    let bus = Bus::connect_once(
        &[verimail_shared::config::defaults::AMQP_URL.to_owned()],
        "gateway-clean-stop-test",
    )
    .await?;
    let channel = bus.channel().await?;
    let topology = Topology::new(app.namespace.as_str());
    verimail_shared::bus::declare_exchange(&channel, &topology).await?;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.name().clone(),
            topology.exchange().into(),
            "verimail.email.verified".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;

    let addr = format!("127.0.0.1:{}", free_port());
    let ops = format!("127.0.0.1:{}", free_port());
    let mut gateway = Command::new(BIN)
        .env_clear()
        .env("DATABASE_URL", format!("{PG}/{}", app.db_name))
        .env("VERIMAIL_NAMESPACE", &app.namespace)
        .env("VERIMAIL_SECRET_KEY", SECRET)
        .env("GATEWAY_ADDR", &addr)
        .env("PUBLIC_BASE_URL", format!("http://{addr}"))
        .env("METRICS_ADDR", &ops)
        .current_dir(std::env::temp_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stderr = gateway.stderr.take().ok_or("stderr is piped")?;
    let log = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });

    let ready = eventually(Duration::from_secs(30), || async {
        status_of("GET", &ops, "/readyz").await == Some(200)
    })
    .await;
    assert!(ready, "the gateway became ready");
    // The button: a GET only shows the page.
    assert_eq!(
        status_of("POST", &addr, &format!("/confirm/{token}")).await,
        Some(200)
    );
    // The relay published the event: its channel is open when the stop comes.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = channel
            .basic_get(queue.name().clone(), BasicGetOptions { no_ack: true })
            .await?;
        if got.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no verimail.email.verified event"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let pid = gateway.id().ok_or("the gateway runs")?;
    let killed = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await?;
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(30), gateway.wait()).await??;
    let stderr = log.await?;
    eprintln!("gateway stderr:\n{stderr}");
    assert!(status.success(), "exit status {status:?}");
    assert!(
        stderr.contains("gateway stopped"),
        "the gateway reached its end"
    );
    // From the stop on (a `/readyz` polled before the broker is connected
    // answers 503, which the HTTP trace logs as an error: not this test's matter).
    let stop = stderr
        .find("shutdown requested")
        .ok_or("the gateway logged the stop")?;
    let errors: Vec<&str> = stderr[stop..]
        .lines()
        .filter(|l| l.contains("ERROR"))
        .collect();
    assert!(errors.is_empty(), "ERROR lines on a clean stop: {errors:?}");

    let _ = channel.close(200, "done".into()).await;
    bus.close().await;
    app.cleanup().await;
    Ok(())
}
