//! The `verimail-gateway` binary stops cleanly: after it has published an
//! event, SIGTERM ends it with exit 0 and not one ERROR line on stderr.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use verimail_shared::bus::{Bus, Topology};

const BIN: &str = env!("CARGO_BIN_EXE_verimail-gateway");

/// `GET path` over a plain socket: the status code, or `None` when nothing answers.
async fn get_status(addr: &str, path: &str) -> Option<u16> {
    request_status("GET", addr, path).await
}

/// `METHOD path` (no body) over a plain socket: the status code.
async fn request_status(method: &str, addr: &str, path: &str) -> Option<u16> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.ok()?;
    answer.split_whitespace().nth(1)?.parse().ok()
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
    // `/readyz` is served on the gateway's operational address, never beside `/confirm`.
    let ops = format!("127.0.0.1:{}", free_port());
    let mut gateway = Command::new(BIN)
        .env_clear()
        .env("DATABASE_URL", format!("{PG}/{}", app.db_name))
        .env("VERIMAIL_NAMESPACE", &app.namespace)
        .env("VERIMAIL_SECRET_KEY", SECRET)
        .env("GATEWAY_ADDR", &addr)
        .env("METRICS_ADDR", &ops)
        .env("PUBLIC_BASE_URL", format!("http://{addr}"))
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
        get_status(&ops, "/readyz").await == Some(200)
    })
    .await;
    assert!(ready, "the gateway became ready");
    // Pressing the button (a GET only shows it).
    assert_eq!(
        request_status("POST", &addr, &format!("/confirm/{token}")).await,
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
