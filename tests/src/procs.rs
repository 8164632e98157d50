//! The real binaries as child processes, started with a test's environment and
//! stopped with SIGTERM (or SIGKILL, for crash tests).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::env::{TestEnv, free_port};

/// Where Cargo put the workspace's binaries (next to the test executable's `deps/`).
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe
        .parent()
        .map(|d| {
            if d.ends_with("deps") {
                d.parent().unwrap_or(d)
            } else {
                d
            }
        })
        .map(PathBuf::from)
        .unwrap_or_default();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`)",
        path.display()
    );
    path
}

/// A running binary; killed when dropped.
#[derive(Debug)]
pub struct Proc {
    /// Which binary.
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `name` with `args` and the test's environment; output goes to a log file.
    pub fn start(name: &str, args: &[&str], env: &TestEnv) -> Self {
        let log = std::env::temp_dir().join(format!(
            "{}-{name}-{}.log",
            env.namespace,
            uuid::Uuid::new_v4().simple()
        ));
        let file = std::fs::File::create(&log).unwrap_or_else(|e| panic!("log file: {e}"));
        let err = file.try_clone().unwrap_or_else(|e| panic!("log file: {e}"));
        let mut command = Command::new(bin_path(name));
        command
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(&env.vars);
        if name == "verimail-gateway" {
            command.env("METRICS_ADDR", &env.gateway_ops_addr);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self {
            name: name.to_owned(),
            child,
            log,
        }
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal (`TERM`, `KILL`, `INT`).
    pub fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            let _ = std::process::Command::new("kill")
                .args([&format!("-{sig}"), &pid.to_string()])
                .status();
        }
    }

    /// SIGTERM, then waits up to `timeout` for the exit; returns the exit code.
    pub async fn stop(mut self, timeout: Duration) -> Option<i32> {
        self.signal("TERM");
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(status)) => status.code(),
            _ => {
                let _ = self.child.kill().await;
                None
            }
        }
    }

    /// SIGKILL, as a crash.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// Runs the `verimail` CLI to completion; returns (exit code, stdout, stderr).
pub async fn cli(args: &[&str], env: &TestEnv) -> (i32, String, String) {
    let out = Command::new(bin_path("verimail"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(&env.vars)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run verimail: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Waits until `url` answers 200, or `timeout`.
pub async fn wait_http_ok(url: &str, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if let Ok((200, _, _)) = crate::http::get(url, &[]).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// `verimail migrate`, once before any service starts, so several services
/// never race to create a new database's tables.
pub async fn migrate(env: &TestEnv) {
    let (code, _, err) = cli(&["migrate"], env).await;
    assert_eq!(code, 0, "verimail migrate failed: {err}");
}

/// Starts a worker with `env` (its `METRICS_ADDR` must be its own) and waits
/// until its `/readyz` answers 200.
pub async fn ready_worker(env: &TestEnv, timeout: Duration) -> Proc {
    let worker = Proc::start("verimail-worker", &[], env);
    let ready = format!(
        "http://{}/readyz",
        env.get("METRICS_ADDR").unwrap_or_default()
    );
    assert!(
        wait_http_ok(&ready, timeout).await,
        "worker never ready:\n{}",
        worker.log()
    );
    worker
}

/// Starts one more worker of `env`'s deployment on a `METRICS_ADDR` of its own
/// (two workers cannot share one port) without waiting for it; returns it and
/// that address. [`ready_extra_worker`] waits too.
pub fn start_extra_worker(env: &TestEnv) -> (Proc, String) {
    let (wenv, addr) = own_metrics(env);
    (Proc::start("verimail-worker", &[], &wenv), addr)
}

/// [`ready_worker`] for one more worker of `env`'s deployment, on a
/// `METRICS_ADDR` of its own; returns it and that address.
pub async fn ready_extra_worker(env: &TestEnv, timeout: Duration) -> (Proc, String) {
    let (wenv, addr) = own_metrics(env);
    (ready_worker(&wenv, timeout).await, addr)
}

/// `env` with a free `METRICS_ADDR`, and that address.
fn own_metrics(env: &TestEnv) -> (TestEnv, String) {
    let mut wenv = env.clone();
    let addr = format!("127.0.0.1:{}", free_port());
    wenv.set("METRICS_ADDR", addr.clone());
    (wenv, addr)
}

/// The `/readyz` URL of a worker whose `METRICS_ADDR` is `metrics_addr`.
pub fn readyz_url(metrics_addr: &str) -> String {
    format!("http://{metrics_addr}/readyz")
}

/// The last `n` lines of a log: enough to see why a process failed without
/// burying the assertion under its whole output.
pub fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Starts a gateway with `env` and waits until its `/readyz` (on its own
/// `METRICS_ADDR`, [`TestEnv::gateway_ops_url`]) answers 200.
pub async fn ready_gateway(env: &TestEnv, timeout: Duration) -> Proc {
    let gateway = Proc::start("verimail-gateway", &[], env);
    assert!(
        wait_http_ok(&format!("{}/readyz", env.gateway_ops_url()), timeout).await,
        "gateway never ready:\n{}",
        gateway.log()
    );
    gateway
}
