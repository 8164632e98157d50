//! `verimail demo`: the quickstart walk-through. Starts the worker and the
//! gateway (the binaries beside this one), publishes one request, finds the
//! mail in the `file://` outbox, clicks its link over HTTP, shows the
//! `verimail.email.verified` event, then keeps the pipeline running for the
//! user to try until Ctrl-C, which stops everything cleanly.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use verimail_shared::Config;
use verimail_shared::bus::{Bus, Topology};
use verimail_shared::config::{MailUrl, outbox_file_name};

use verimail_producer::{Producer, VerificationRequest};

use crate::cli::listen::temporary_consumer;

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

    // The services need a secret. A demo without one makes one and keeps it
    // in ./.env, so the commands of a second terminal in this folder (token
    // inspect, a later run of the services) use the key of the demo's links.
    let mut extra_env = Vec::new();
    if config.keys().is_err() {
        let secret = format!(
            "demo-{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        match save_secret(Path::new(DOTENV), &secret) {
            Ok(Saved::Written) => println!(
                "  (no VERIMAIL_SECRET_KEY was set: made one and wrote it to ./{DOTENV}, mode 0600;\n   \
                 verimail commands run in this folder use it)"
            ),
            Ok(Saved::EntryExists) => println!(
                "  (VERIMAIL_SECRET_KEY is empty in ./{DOTENV}, which is left as it is: \
                 using a throwaway key for this demo)"
            ),
            Err(e) => println!(
                "  (no VERIMAIL_SECRET_KEY set, and ./{DOTENV} could not be written ({e}): \
                 using a throwaway key for this demo)"
            ),
        }
        extra_env.push(("VERIMAIL_SECRET_KEY".to_owned(), secret));
    }

    // The app's side of codes (POST /v1/codes/verify) needs an API key. A
    // demo without one gives its gateway a throwaway key, printed below for
    // the second terminal: it lives as long as this demo's gateway.
    let api_key = match config.gateway_api_keys.is_empty() {
        true => {
            let key = format!("demo-api-{}", uuid::Uuid::new_v4().simple());
            extra_env.push(("GATEWAY_API_KEYS".to_owned(), key.clone()));
            Some(key)
        }
        false => None,
    };

    step(0, "starting verimail-worker and verimail-gateway");
    let mut children = Vec::new();
    for name in ["verimail-worker", "verimail-gateway"] {
        children.push(spawn(name, &logs, &extra_env)?);
    }
    let outcome = walk_through(config, &outbox, &shutdown, &mut children).await;
    if let Err(e) = &outcome {
        println!("\n✗ {e:#}\n  logs: {}", logs.display());
    } else {
        println!("{}", try_it(config, &outbox, &logs, api_key.as_deref()));
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
    // The gateway serves its health endpoints on its own operational address,
    // never beside `/confirm`.
    let gateway_ops = format!("http://{}", config.gateway_metrics_addr);
    tokio::select! {
        r = async {
            wait_ready(&format!("{metrics}/readyz"), "verimail-worker").await?;
            wait_ready(&format!("{gateway_ops}/readyz"), "verimail-gateway").await
        } => r?,
        () = shutdown.cancelled() => bail!("interrupted"),
        name = first_exit(children) => bail!("{name} exited during start-up"),
    }
    println!("    worker ready (metrics on {metrics}), gateway ready on {gateway}");

    let mut events = tap(config).await?;
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

    let (path, link, code) = find_mail(outbox, &id).await?;
    step(3, "the mail is in the outbox");
    println!("    {}", path.display());
    println!("    link: {link}");
    if let Some(code) = code {
        // The app would take this code in a form and ask the gateway
        // (POST /v1/codes/verify); the demo confirms with the button instead.
        println!("    code: {code}  (the same mail's code; either confirms, once)");
    }

    // Opening the link shows the page with its button (mail scanners open
    // links too, so a GET never confirms); pressing the button POSTs.
    let page = http_status("GET", &link).await?;
    let status = http_status("POST", &link).await?;
    step(
        4,
        &format!(
            "opened the link ({page}: the page with its button) and pressed the button: {status}"
        ),
    );

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
        if matches!(http_status("GET", url).await, Ok(200)) {
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
    let topology = Topology::new(config.namespace.clone());
    let (_channel, mut consumer) = temporary_consumer(
        &bus,
        &topology,
        &["verimail.#"],
        BasicConsumeOptions::default(),
        "starting the demo's tap",
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

/// The mail of request `id` in the outbox (`{id}.eml`), its confirm link and
/// its code (`CONFIRM_METHOD=link` mails none).
async fn find_mail(outbox: &Path, id: &str) -> anyhow::Result<(PathBuf, String, Option<String>)> {
    let path = outbox.join(outbox_file_name(id));
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        if path.is_file() {
            let mail = crate::cli::outbox::read(&path)?;
            let link = mail.link.with_context(|| {
                format!(
                    "no confirm link in {} (the demo presses the link's button: \
                         CONFIRM_METHOD must be both or link)",
                    path.display()
                )
            })?;
            return Ok((path, link, mail.code));
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("no mail {} within {} s", path.display(), STEP.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `METHOD url` (no body) over a plain socket; returns the status code. Enough
/// for the demo's own loopback calls, so the CLI carries no HTTP client library.
async fn http_status(method: &str, url: &str) -> anyhow::Result<u16> {
    let rest = url
        .strip_prefix("http://")
        .context("the demo only speaks http://")?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let mut stream = tokio::net::TcpStream::connect(authority).await?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nAccept: text/html\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
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

/// Where the demo keeps the key it made: the file every command reads.
const DOTENV: &str = ".env";

/// What [`save_secret`] did.
#[derive(Debug, PartialEq, Eq)]
enum Saved {
    /// `VERIMAIL_SECRET_KEY=…` was added (the file created if missing).
    Written,
    /// The file already names `VERIMAIL_SECRET_KEY` (empty, since no key was
    /// configured): it is never overwritten.
    EntryExists,
}

/// Adds `VERIMAIL_SECRET_KEY=secret` to the dotenv file at `path`, readable
/// by its owner only (mode 0600, also when the file existed: it now holds a
/// secret), unless the file already has an entry for the variable.
fn save_secret(path: &Path, secret: &str) -> std::io::Result<Saved> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};

    let existing = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    let has_entry = existing.lines().any(|line| {
        let line = line.trim_start();
        let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
        line.strip_prefix("VERIMAIL_SECRET_KEY")
            .is_some_and(|rest| rest.trim_start().starts_with('='))
    });
    if has_entry {
        return Ok(Saved::EntryExists);
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    let separator = if existing.is_empty() || existing.ends_with('\n') {
        ""
    } else {
        "\n"
    };
    writeln!(
        file,
        "{separator}# Made by `verimail demo`: the key that signs the links.\nVERIMAIL_SECRET_KEY={secret}"
    )?;
    Ok(Saved::Written)
}

/// What to try in a second terminal, with commands that run as printed: the
/// `verimail` on PATH if it is this one, else this binary's path; the
/// namespace named, since it may come from this terminal's environment.
fn try_it(config: &Config, outbox: &Path, logs: &Path, api_key: Option<&str>) -> String {
    let exe = std::env::current_exe().ok();
    let on_path = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| {
            let candidate = dir.join("verimail");
            candidate.is_file()
                && candidate.canonicalize().ok() == exe.as_ref().and_then(|e| e.canonicalize().ok())
        })
    });
    let verimail = match (&exe, on_path) {
        (Some(exe), false) => exe.display().to_string(),
        _ => "verimail".to_owned(),
    };
    let mut exports = format!("    export VERIMAIL_NAMESPACE={}\n", config.namespace);
    if let Ok(mail_url) = std::env::var("MAIL_URL") {
        exports.push_str(&format!("    export MAIL_URL={mail_url}\n"));
    }
    format!(
        "\nThe pipeline keeps running. Try it yourself, in another terminal, in this folder\n\
         (the commands read ./{DOTENV} too; jq and curl are needed for the link):\n\
         \n{exports}\
         \x20   {verimail} listen verimail.email.verified &\n\
         \x20   id=$({verimail} publish --user-id 7 --email you@example.com --name You)\n\
         \x20   {verimail} outbox \"$id\" --wait 10\n\
         \x20   link=$({verimail} outbox \"$id\" | jq -r .link)\n\
         \x20   curl -s -X POST -H 'Accept: application/json' \"$link\"; echo\n\
         \x20   {verimail} token inspect \"$link\"\n\
         \x20   # or by code, as your app's backend would (another user, another mail):\n\
         \x20   id=$({verimail} publish --user-id 8 --email you@example.com)\n\
         \x20   code=$({verimail} outbox \"$id\" --wait 10 | jq -r .code)\n\
         \x20   curl -s -X POST http://{gateway}/v1/codes/verify -H \"Authorization: Bearer {key}\" \\\n\
         \x20        -d \"{{\\\"user_id\\\": \\\"8\\\", \\\"code\\\": \\\"$code\\\"}}\"; echo\n\
         \x20   kill %1\n\
         \nMails land in {} ; links point at {} ; logs are in {}\n\
         Press Ctrl-C to stop everything.",
        outbox.display(),
        config.public_base_url,
        logs.display(),
        gateway = config.gateway_addr,
        // A key the user configured is theirs to type; ours is a throwaway.
        key = api_key.unwrap_or("$VERIMAIL_API_KEY"),
    )
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn folder() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("verimail-demo-env-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("a folder");
        dir
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path)
            .expect("the file exists")
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn a_new_dotenv_holds_the_key_and_only_its_owner_reads_it() {
        let dir = folder();
        let path = dir.join(".env");
        assert_eq!(save_secret(&path, "k1").ok(), Some(Saved::Written));
        let text = std::fs::read_to_string(&path).expect("written");
        assert!(
            text.lines().any(|l| l == "VERIMAIL_SECRET_KEY=k1"),
            "{text}"
        );
        assert_eq!(mode(&path), 0o600);
        // What the commands of a second terminal read back.
        let read: Vec<(String, String)> = dotenvy::from_path_iter(&path)
            .expect("a dotenv file")
            .collect::<Result<_, _>>()
            .expect("valid entries");
        assert_eq!(read, vec![("VERIMAIL_SECRET_KEY".into(), "k1".into())]);
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn an_existing_dotenv_keeps_its_lines_and_an_existing_entry_is_never_replaced() {
        let dir = folder();
        let path = dir.join(".env");
        std::fs::write(&path, "VERIMAIL_NAMESPACE=mine").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert_eq!(save_secret(&path, "k1").ok(), Some(Saved::Written));
        let text = std::fs::read_to_string(&path).expect("written");
        assert!(text.starts_with("VERIMAIL_NAMESPACE=mine\n"), "{text}");
        assert!(text.ends_with("VERIMAIL_SECRET_KEY=k1\n"), "{text}");
        assert_eq!(mode(&path), 0o600, "it holds a secret now");

        assert_eq!(save_secret(&path, "k2").ok(), Some(Saved::EntryExists));
        std::fs::write(&path, "export VERIMAIL_SECRET_KEY =\n").expect("write");
        assert_eq!(save_secret(&path, "k3").ok(), Some(Saved::EntryExists));
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            "export VERIMAIL_SECRET_KEY =\n"
        );
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
