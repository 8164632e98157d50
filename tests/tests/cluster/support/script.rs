//! `scripts/rabbitmq-cluster.sh` from the tests (up, leader, kill, start,
//! status, ctl), and what the services' logs say about where they connected.

use std::process::Stdio;

use anyhow::{Context as _, ensure};

/// Runs `scripts/rabbitmq-cluster.sh ARGS` on a blocking thread; its stdout, trimmed.
pub async fn cluster(args: &[&str]) -> anyhow::Result<String> {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scripts/rabbitmq-cluster.sh"
    );
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(script)
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {script}"))?;
        ensure!(
            out.status.success(),
            "rabbitmq-cluster.sh {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    })
    .await?
}

/// The node leading `queue` and its AMQP port (`leader` prints `NODE PORT`).
pub async fn leader(queue: &str) -> anyhow::Result<(String, u16)> {
    let out = cluster(&["leader", queue]).await?;
    let (node, port) = out
        .split_once(' ')
        .with_context(|| format!("leader printed {out:?}"))?;
    Ok((node.to_owned(), port.parse()?))
}

/// The AMQP port of the node a service last said it connected to (the
/// `connected to RabbitMQ` log line of `Bus`, whose URL names the port).
pub fn connected_port(log: &str) -> Option<u16> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("connected to RabbitMQ\""))?;
    let after = &line[line.find("127.0.0.1:")? + "127.0.0.1:".len()..];
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// How many times a service logged a new broker connection.
pub fn connections_made(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("connected to RabbitMQ\""))
        .count()
}
