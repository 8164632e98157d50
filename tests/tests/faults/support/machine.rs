//! Guards that stop the machine's RabbitMQ or PostgreSQL and put them back
//! whatever happens (also when the test panics), and the switch that lets
//! those tests run at all.

use std::time::{Duration, Instant};

/// Whether the tests that stop the machine's RabbitMQ or PostgreSQL may run:
/// only with `VERIMAIL_FAULT_TESTS=1` (`scripts/test.sh` sets it and runs them
/// alone), so a contributor's plain `cargo test` never stops their database
/// or a neighbouring test's broker.
pub fn machine_faults_allowed(test: &str) -> bool {
    let allowed = std::env::var("VERIMAIL_FAULT_TESTS").is_ok_and(|v| v == "1");
    if !allowed {
        eprintln!(
            "{test}: skipped: it stops the machine's broker or database \
             (VERIMAIL_FAULT_TESTS=1 runs it; scripts/test.sh does)"
        );
    }
    allowed
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    )
    .is_ok()
}

fn wait_port(port: u16, open: bool, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if port_open(port) == open {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    match std::process::Command::new(cmd).args(args).output() {
        Ok(out) => (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ),
        Err(e) => (false, format!("cannot run {cmd}: {e}")),
    }
}

/// How long a service was away.
#[derive(Debug, Clone, Copy)]
pub struct Outage {
    /// The stop command's own duration.
    pub stopping: Duration,
    /// From the port closing to the port answering again.
    pub down: Duration,
}

/// Stops the RabbitMQ application of the machine's broker (5672); starting it
/// again is [`BrokerDown::start`], or dropping the guard (also when the test
/// panics).
pub struct BrokerDown {
    down_since: Option<Instant>,
    stopping: Duration,
    started: bool,
}

impl BrokerDown {
    pub fn stop() -> Self {
        // The guard exists before anything can fail, so the broker always comes back.
        let mut guard = Self {
            down_since: None,
            stopping: Duration::ZERO,
            started: false,
        };
        let t = Instant::now();
        let (ok, out) = run("rabbitmqctl", &["stop_app"]);
        assert!(ok, "rabbitmqctl stop_app failed: {out}");
        assert!(
            wait_port(5672, false, Duration::from_secs(30)),
            "5672 still open after stop_app"
        );
        guard.stopping = t.elapsed();
        guard.down_since = Some(Instant::now());
        guard
    }

    /// `rabbitmqctl start_app`, then waits for the port.
    pub fn start(mut self) -> Outage {
        self.start_now();
        Outage {
            stopping: self.stopping,
            down: self.down_since.map(|t| t.elapsed()).unwrap_or_default(),
        }
    }

    fn start_now(&mut self) {
        if std::mem::replace(&mut self.started, true) {
            return;
        }
        let (ok, out) = run("rabbitmqctl", &["start_app"]);
        if !ok {
            eprintln!("rabbitmqctl start_app failed: {out}");
        }
        if !wait_port(5672, true, Duration::from_secs(60)) {
            eprintln!("RabbitMQ did not open 5672 again within 60 s");
        }
    }
}

impl Drop for BrokerDown {
    fn drop(&mut self) {
        self.start_now();
    }
}

/// The machine's PostgreSQL cluster version (`ls /etc/postgresql`).
fn pg_version() -> String {
    std::fs::read_dir("/etc/postgresql")
        .ok()
        .and_then(|mut d| d.next())
        .and_then(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .expect("PostgreSQL is installed (/etc/postgresql/VERSION)")
}

/// Stops the machine's PostgreSQL cluster (5432, fast shutdown: sessions are
/// cut); starting it again is [`DatabaseDown::start`], or dropping the guard
/// (also when the test panics).
pub struct DatabaseDown {
    version: String,
    down_since: Option<Instant>,
    stopping: Duration,
    started: bool,
}

impl DatabaseDown {
    pub fn stop() -> Self {
        let mut guard = Self {
            version: pg_version(),
            down_since: None,
            stopping: Duration::ZERO,
            started: false,
        };
        let t = Instant::now();
        let (ok, out) = run(
            "pg_ctlcluster",
            &[
                "--skip-systemctl-redirect",
                &guard.version,
                "main",
                "stop",
                "-m",
                "fast",
            ],
        );
        assert!(ok, "pg_ctlcluster stop failed: {out}");
        guard.stopping = t.elapsed();
        guard.down_since = Some(Instant::now());
        guard
    }

    /// `pg_ctlcluster start`, then waits for the port.
    pub fn start(mut self) -> Outage {
        self.start_now();
        Outage {
            stopping: self.stopping,
            down: self.down_since.map(|t| t.elapsed()).unwrap_or_default(),
        }
    }

    fn start_now(&mut self) {
        if std::mem::replace(&mut self.started, true) {
            return;
        }
        if !port_open(5432) {
            let (ok, out) = run(
                "pg_ctlcluster",
                &["--skip-systemctl-redirect", &self.version, "main", "start"],
            );
            if !ok {
                eprintln!("pg_ctlcluster start failed: {out}");
            }
        }
        if !wait_port(5432, true, Duration::from_secs(60)) {
            eprintln!("PostgreSQL did not open 5432 again within 60 s");
        }
    }
}

impl Drop for DatabaseDown {
    fn drop(&mut self) {
        self.start_now();
    }
}
