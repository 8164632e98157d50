//! The `verimail-gateway` binary stops cleanly: after it has published an
//! event, SIGTERM ends it with exit 0 and not one ERROR line on stderr.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use verimail_shared::events::EMAIL_VERIFIED;

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
    let tap = EventTap::bind(&app.namespace, "clean-stop", EMAIL_VERIFIED).await;

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
    assert!(
        tap.next(Duration::from_secs(20)).await.is_some(),
        "no verimail.email.verified event"
    );

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

    tap.cleanup().await;
    app.cleanup().await;
    Ok(())
}
