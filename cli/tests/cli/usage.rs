//! What every subcommand shares: exit codes (1 for a wrong variable or an
//! unreachable broker, 2 for a wrong flag), `--help` and `--version`, and
//! variables a command does not use being ignored.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{Broker, namespace};
use crate::support::{SECRET, command, run, stderr, stdout};

fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("an address").port()
}

#[tokio::test]
async fn an_unreachable_broker_fails_fast_with_exit_1() {
    let ns = namespace();
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", closed_port());
    for args in [
        &["publish", "--user-id", "1", "--email", "a@example.com"][..],
        &["dead", "list"][..],
        &["dead", "replay", "--all"][..],
        &["listen"][..],
    ] {
        let started = Instant::now();
        let out = run(&ns, &[("AMQP_URL", &url)], args).await;
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{args:?} took {:?}",
            started.elapsed()
        );
        assert!(
            stderr(&out).contains("no RabbitMQ node answered"),
            "{args:?}"
        );
        assert!(
            !stderr(&out).contains(":guest@"),
            "the password is redacted"
        );
    }
}

#[tokio::test]
async fn a_wrong_variable_fails_with_exit_1_and_a_wrong_flag_with_exit_2() {
    let ns = namespace();
    let out = run(
        &ns,
        &[
            ("TOKEN_TTL_SECONDS", "soon"),
            ("VERIMAIL_SECRET_KEY", SECRET),
        ],
        &["token", "mint", "--email", "alice@example.com"],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("error: TOKEN_TTL_SECONDS: "),
        "{}",
        stderr(&out)
    );

    let out = run(&ns, &[], &["--namespace", "a b", "dead", "list"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).starts_with("error: --namespace: "),
        "{}",
        stderr(&out)
    );

    let out = run(&ns, &[], &["dead", "replay"]).await;
    assert_eq!(out.status.code(), Some(2), "replay needs --id or --all");
    let out = run(&ns, &[], &["dead", "replay", "--id", "x", "--all"]).await;
    assert_eq!(out.status.code(), Some(2), "not both");
}

#[tokio::test]
async fn help_and_version_exit_0_and_demo_is_a_subcommand() {
    let ns = namespace();
    let out = run(&ns, &[], &["--version"]).await;
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).starts_with("verimail "));
    for args in [
        &["--help"][..],
        &["publish", "--help"][..],
        &["dead", "replay", "--help"][..],
    ] {
        let out = run(&ns, &[], args).await;
        assert_eq!(out.status.code(), Some(0));
        assert!(
            stdout(&out).contains("Example"),
            "{args:?} teaches by example"
        );
    }
    let out = run(&ns, &[], &["demo", "--help"]).await;
    assert_eq!(out.status.code(), Some(0));
    let out = run(&ns, &[], &["no-such-command"]).await;
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test]
async fn a_command_ignores_variables_it_does_not_use_even_from_dotenv() {
    let ns = namespace();
    let broker = Broker::new(&ns).await;
    let mine = format!("{ns}.sub.check");
    broker.bind(&mine, "verimail.verification.requested").await;
    // The worker's and the gateway's variables, wrong, in the environment and in ./.env.
    let wrong = [
        ("THROTTLE_SECONDS", "soon"),
        ("WORKER_CONCURRENCY", "0"),
        ("GATEWAY_ADDR", "nowhere"),
        ("MAIL_URL", "pigeon://coop"),
    ];
    let folder = std::env::temp_dir().join(format!("verimail-cli-dotenv-{ns}"));
    std::fs::create_dir_all(&folder).expect("a folder");
    std::fs::write(
        folder.join(".env"),
        "THROTTLE_SECONDS=later\nCONFIRM_RATE_LIMIT_PER_MINUTE=none\nPUBLIC_BASE_URL=ftp://x\n",
    )
    .expect("write .env");
    let publish = ["publish", "--user-id", "42", "--email", "alice@example.com"];
    let out = command(&ns, &wrong, &publish)
        .current_dir(&folder)
        .output()
        .await
        .expect("the binary runs");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(broker.take(&mine).await.is_some(), "the request landed");

    let out = command(&ns, &wrong, &["token", "inspect", "v1.a.b.c"])
        .env("VERIMAIL_SECRET_KEY", SECRET)
        .env("AMQP_URL", "not a url")
        .current_dir(&folder)
        .output()
        .await
        .expect("the binary runs");
    assert_eq!(
        out.status.code(),
        Some(1),
        "invalid, not a configuration error"
    );
    let answer: Value = serde_json::from_slice(&out.stdout).expect("the inspection");
    assert_eq!(answer["status"], "invalid");

    // A variable the command does use is still checked.
    let out = command(&ns, &[("AMQP_URL", "not a url")], &publish)
        .output()
        .await
        .expect("the binary runs");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("error: AMQP_URL: "),
        "{}",
        stderr(&out)
    );
    std::fs::remove_dir_all(&folder).expect("clean up");
    broker.cleanup(&[&mine]).await;
}

#[tokio::test]
async fn help_does_not_show_an_unset_namespace_as_empty() {
    let ns = namespace();
    let out = command(&ns, &[], &["--help"])
        .env_remove("VERIMAIL_NAMESPACE")
        .output()
        .await
        .expect("the binary runs");
    assert_eq!(out.status.code(), Some(0));
    assert!(
        !stdout(&out).contains("VERIMAIL_NAMESPACE="),
        "{}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains("verimail outbox"),
        "the outbox is taught"
    );
}
