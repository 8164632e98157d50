//! What every room of the CLI tests shares: running the binary with a clean
//! environment and reading its answer, and a database of one's own for the
//! subcommands that need PostgreSQL (`migrate`, `suppression`).

use std::process::Output;

use serde_json::Value;
use tokio::process::Command;

use crate::common;

const BIN: &str = env!("CARGO_BIN_EXE_verimail");
/// The secret of the token commands.
pub const SECRET: &str = "cli-test-secret";

/// The command with a clean environment: only what the test gives.
pub fn command(ns: &str, env: &[(&str, &str)], args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .current_dir(std::env::temp_dir())
        .env("VERIMAIL_NAMESPACE", ns)
        .env("AMQP_URL", common::AMQP_URL)
        .args(args)
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs the binary to its end; its answer is printed for a failing test's log.
pub async fn run(ns: &str, env: &[(&str, &str)], args: &[&str]) -> Output {
    let output = command(ns, env, args)
        .output()
        .await
        .expect("the binary runs");
    eprintln!(
        "verimail {args:?} -> {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Standard output as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Standard error as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Standard output as JSON lines (the list commands' format).
pub fn json_lines(o: &Output) -> Vec<Value> {
    stdout(o)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

/// A database name of its own for one test: the command creates it (as
/// every command that needs PostgreSQL does), [`TestDb::remove`] drops it.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    /// A fresh name; nothing exists until a command connects.
    pub fn new() -> Self {
        let name = format!("verimail_cli_{}", uuid::Uuid::new_v4().simple());
        let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
        Self { name, url }
    }

    /// `DATABASE_URL` for [`run`].
    pub fn env(&self) -> [(&str, &str); 1] {
        [("DATABASE_URL", self.url.as_str())]
    }

    /// Best effort: drops the test database.
    pub async fn remove(self) {
        if let Ok(mut conn) = <sqlx::PgConnection as sqlx::Connection>::connect(
            "postgres://postgres@127.0.0.1:5432/postgres",
        )
        .await
        {
            let drop = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(drop))
                .execute(&mut conn)
                .await;
        }
    }
}
