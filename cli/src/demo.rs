//! `verimail demo`: the quickstart walk-through. Starts the worker and the
//! gateway (the binaries beside this one), publishes one request, finds the
//! mail in the `file://` outbox, clicks its link over HTTP, shows the
//! `verimail.email.verified` event, then keeps the pipeline running for the
//! user to try until Ctrl-C, which stops everything cleanly.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, bail};
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use verimail_shared::Config;
use verimail_shared::bus::{self, Bus, Topology};
use verimail_shared::config::MailUrl;

use verimail_producer::{Producer, VerificationRequest};

/// How long each step may take before the demo says what is wrong.
const STEP: Duration = Duration::from_secs(60);

/// Runs the walk-through; returns when the user presses Ctrl-C.
pub async fn run(config: &Config) -> anyhow::Result<()> {
    let shutdown = verimail_shared::shutdown::on_signal();
    let MailUrl::File(outbox) = &config.mail_url else {
        bail!(
            "MAIL_URL: the demo reads the mail from a file:// outbox; unset MAIL_URL to use ./outbox"
        );
    };
    let outbox = outbox.clone();
    let logs = std::env::temp_dir().join(format!("verimail-demo-{}", std::process::id()));
    std::fs::create_dir_all(&logs).context("cannot create the log folder")?;

    // The services need a secret; a demo without one gets a throwaway key.
    let mut extra_env = Vec::new();
    if config.keys().is_err() {
        let secret = format!("demo-{}", uuid::Uuid::new_v4().simple());
        extra_env.push(("VERIMAIL_SECRET_KEY".to_owned(), secret));
        println!("  (no VERIMAIL_SECRET_KEY set: using a throwaway key for this demo)");
    }

    step(0, "starting verimail-worker and verimail-gateway");
    let mut children = Vec::new();
    for name in ["verimail-worker", "verimail-gateway"] {
        children.push(spawn(name, &logs, &extra_env)?);
    }
    let outcome = walk_through(config, &outbox, &shutdown, &mut children).await;
    if let Err(e) = &outcome {
        println!("\n✗ {e:#}\n  logs: {}", logs.display());
    } else {
        println!(
            "\nThe pipeline keeps running. Try it yourself, in another terminal:\n\
             \n    target/debug/verimail publish --user-id 7 --email you@example.com --name You\n\
             \nMails land in {} ; links point at {} ; logs are in {}\n\
             Press Ctrl-C to stop everything.",
            outbox.display(),
            config.public_base_url,
            logs.display()
        );
        tokio::select! {
            () = shutdown.cancelled() => {}
            name = first_exit(&mut children) => println!("\n{name} stopped unexpectedly; see {}", logs.display()),
        }
    }
    println!("\nstopping…");
    for child in &mut children {
        terminate(child).await;
    }
    println!("stopped cleanly");
    outcome
}

async fn walk_through(
    config: &Config,
    outbox: &Path,
    shutdown: &tokio_util::sync::CancellationToken,
    children: &mut [Child],
) -> anyhow::Result<()> {
    let gateway = format!("http://{}", config.gateway_addr);
    let metrics = format!("http://{}", config.metrics_addr);
    tokio::select! {
        r = async {
            wait_ready(&format!("{metrics}/readyz"), "verimail-worker").await?;
            wait_ready(&format!("{gateway}/readyz"), "verimail-gateway").await
        } => r?,
        () = shutdown.cancelled() => bail!("interrupted"),
        name = first_exit(children) => bail!("{name} exited during start-up"),
    }
    println!("    worker ready (metrics on {metrics}), gateway ready on {gateway}");

    let mut events = tap(config).await?;
    let started = SystemTime::now();
    let producer = Producer::connect_once(config)
        .await
        .context("cannot publish")?;
    let request = VerificationRequest::new(
        format!("demo-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
        "demo@example.com",
    )
    .name("Demo User")
    .context(json!({"came_from": "verimail demo"}));
    let id = producer.request_verification(request).await?;
    step(1, "published verimail.verification.requested");
    println!("    id {id}");

    let sent = wait_event(&mut events, |e| {
        e["data"]["request_id"] == id.as_str() && e["type"] != "verimail.verification.requested"
    })
    .await
    .context("no outcome from the worker")?;
    step(
        2,
        &format!(
            "the worker answered {}",
            sent["type"].as_str().unwrap_or("?")
        ),
    );
    if sent["type"] != "verimail.verification.sent" {
        bail!("expected verimail.verification.sent, got {sent}");
    }
    println!(
        "    sent_at {}  expires_at {}",
        sent["data"]["sent_at"], sent["data"]["expires_at"]
    );

    let (path, link) = find_mail(outbox, started).await?;
    step(3, "the mail is in the outbox");
    println!("    {}", path.display());
    println!("    link: {link}");

    let status = http_get_status(&link).await?;
    step(4, &format!("clicked the link over HTTP: {status}"));

    let verified = wait_event(&mut events, |e| {
        e["type"] == "verimail.email.verified" && e["data"]["request_id"] == id.as_str()
    })
    .await
    .context("no verimail.email.verified event")?;
    step(5, "verimail.email.verified received — verified");
    println!("    {verified}");
    Ok(())
}

fn step(n: u32, what: &str) {
    println!("[{n}] {what}");
}

fn spawn(name: &str, logs: &Path, extra_env: &[(String, String)]) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("cannot find the verimail executable")?;
    let path = exe.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} is missing: build it first (`cargo build --workspace --bins`)",
            path.display()
        );
    }
    let log = std::fs::File::create(logs.join(format!("{name}.log")))?;
    Command::new(&path)
        .envs(extra_env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", path.display()))
}

/// Resolves with the name of the first child that exits.
async fn first_exit(children: &mut [Child]) -> String {
    loop {
        for (i, child) in children.iter_mut().enumerate() {
            if !matches!(child.try_wait(), Ok(None)) {
                return ["verimail-worker", "verimail-gateway"]
                    .get(i)
                    .copied()
                    .unwrap_or("a service")
                    .to_owned();
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// SIGTERM, then up to 30 s for a clean exit, then SIGKILL.
async fn terminate(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
    }
    if tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

async fn wait_ready(url: &str, what: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + STEP;
    while tokio::time::Instant::now() < deadline {
        if matches!(http_get_status(url).await, Ok(200)) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!(
        "{what} did not become ready at {url} within {} s",
        STEP.as_secs()
    )
}

/// A temporary queue on the namespace's exchange, its events sent down a channel.
async fn tap(config: &Config) -> anyhow::Result<mpsc::UnboundedReceiver<Value>> {
    let bus = Bus::connect_once(&config.amqp_urls, "verimail-demo").await?;
    let channel = bus.channel().await?;
    let topology = Topology::new(config.namespace.clone());
    bus::declare(&channel, &topology).await?;
    let queue = bus::bind_temporary_queue(&channel, topology.exchange(), &["verimail.#"]).await?;
    let mut consumer = channel
        .basic_consume(
            queue,
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        // Keeps the bus (and so the connection) alive as long as the tap runs.
        let _bus = bus;
        while let Some(Ok(delivery)) = consumer.next().await {
            let _ = delivery.ack(BasicAckOptions::default()).await;
            if let Ok(event) = serde_json::from_slice::<Value>(&delivery.data)
                && tx.send(event).is_err()
            {
                break;
            }
        }
    });
    Ok(rx)
}

async fn wait_event(
    events: &mut mpsc::UnboundedReceiver<Value>,
    wanted: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let found = tokio::time::timeout(STEP, async {
        while let Some(e) = events.recv().await {
            if wanted(&e) {
                return Some(e);
            }
        }
        None
    })
    .await;
    match found {
        Ok(Some(e)) => Ok(e),
        _ => bail!("nothing within {} s", STEP.as_secs()),
    }
}

/// The newest `.eml` written since `since`, and the confirm link inside it.
async fn find_mail(outbox: &Path, since: SystemTime) -> anyhow::Result<(PathBuf, String)> {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        if let Some(found) = scan_outbox(outbox, since) {
            return Ok(found);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "no new mail in {} within {} s",
                outbox.display(),
                STEP.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn scan_outbox(outbox: &Path, since: SystemTime) -> Option<(PathBuf, String)> {
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    for entry in std::fs::read_dir(outbox).ok()?.flatten() {
        let path = entry.path();
        let modified = entry.metadata().and_then(|m| m.modified()).ok()?;
        if path.extension().is_some_and(|e| e == "eml")
            && modified >= since
            && newest.as_ref().is_none_or(|(t, _)| modified > *t)
        {
            newest = Some((modified, path));
        }
    }
    let (_, path) = newest?;
    let raw = std::fs::read(&path).ok()?;
    let message = mail_parser::MessageParser::default().parse(&raw)?;
    let text = message.body_text(0)?;
    let start = text.find("http")?;
    let link: String = text[start..]
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '>' && *c != '"')
        .collect();
    link.contains("/confirm/").then_some((path, link))
}

/// `GET url` over a plain socket; returns the status code. Enough for the
/// demo's own loopback calls, so the CLI carries no HTTP client library.
async fn http_get_status(url: &str) -> anyhow::Result<u16> {
    let rest = url
        .strip_prefix("http://")
        .context("the demo only speaks http://")?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let mut stream = tokio::net::TcpStream::connect(authority).await?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nAccept: text/html\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut head = [0u8; 16];
    let n = stream.read(&mut head).await?;
    let line = String::from_utf8_lossy(&head[..n]);
    line.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("not an HTTP answer")
}
