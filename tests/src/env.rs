//! A fresh, isolated deployment per test: its own namespace on the shared
//! broker, its own database, its own ports.

use std::collections::BTreeMap;
use std::net::TcpListener;

use verimail_shared::Config;

/// The settings of one test's deployment, as environment variables for the
/// child processes and as a [`Config`] for in-process helpers.
#[derive(Debug, Clone)]
pub struct TestEnv {
    /// `VERIMAIL_NAMESPACE`, unique per test.
    pub namespace: String,
    /// The database name, unique per test.
    pub database: String,
    /// Every variable handed to the binaries.
    pub vars: BTreeMap<String, String>,
    /// The gateway's `METRICS_ADDR` (its `/healthz`, `/readyz`, `/metrics`):
    /// a port of its own, so a worker and a gateway of one test never collide.
    pub gateway_ops_addr: String,
}

/// A free TCP port on 127.0.0.1 (bound then released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

impl TestEnv {
    /// A new deployment named after `label` (kept short: it ends up in queue names).
    pub fn new(label: &str) -> Self {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let short = &suffix[..12];
        let namespace = format!("t-{label}-{short}");
        let database = format!("vm_{}_{short}", label.replace('-', "_"));
        let gateway_port = free_port();
        let mut vars = BTreeMap::new();
        let mut set = |k: &str, v: String| {
            vars.insert(k.to_owned(), v);
        };
        set(
            "AMQP_URL",
            std::env::var("TEST_AMQP_URL")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
        );
        set(
            "DATABASE_URL",
            format!(
                "{}/{database}",
                std::env::var("TEST_DATABASE_BASE")
                    .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
            ),
        );
        set("VERIMAIL_NAMESPACE", namespace.clone());
        set("VERIMAIL_SECRET_KEY", format!("test-secret-{suffix}"));
        set("GATEWAY_ADDR", format!("127.0.0.1:{gateway_port}"));
        set(
            "PUBLIC_BASE_URL",
            format!("http://127.0.0.1:{gateway_port}"),
        );
        set("METRICS_ADDR", format!("127.0.0.1:{}", free_port()));
        set("LOG_FORMAT", "json".into());
        set("RUST_LOG", "info".into());
        set("WORKER_CONCURRENCY", "16".into());
        Self {
            namespace,
            database,
            vars,
            gateway_ops_addr: format!("127.0.0.1:{}", free_port()),
        }
    }

    /// Sets (or overrides) one variable.
    pub fn set(&mut self, key: &str, value: impl Into<String>) -> &mut Self {
        self.vars.insert(key.to_owned(), value.into());
        self
    }

    /// A variable's value.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars.get(key).map(String::as_str)
    }

    /// The same settings as a [`Config`].
    pub fn config(&self) -> Config {
        let vars = self.vars.clone();
        Config::from_lookup(|name| vars.get(name).cloned())
            .unwrap_or_else(|e| panic!("test configuration is invalid: {e}"))
    }

    /// The gateway's base URL.
    pub fn gateway_url(&self) -> String {
        self.get("PUBLIC_BASE_URL").unwrap_or_default().to_owned()
    }

    /// The base URL of the gateway's operational endpoints.
    pub fn gateway_ops_url(&self) -> String {
        format!("http://{}", self.gateway_ops_addr)
    }

    /// Deletes the namespace's queues and exchange and drops the database
    /// (best effort: a failing cleanup must not hide the test's own result).
    pub async fn cleanup(&self) {
        let config = self.config();
        if let Ok(conn) =
            lapin::Connection::connect(&config.amqp_urls[0], lapin::ConnectionProperties::default())
                .await
            && let Ok(ch) = conn.create_channel().await
        {
            let topology = verimail_shared::bus::Topology::new(&self.namespace);
            let mut queues = vec![topology.worker_queue(), topology.dead_queue()];
            queues.extend(
                verimail_shared::bus::RETRY_DELAYS
                    .iter()
                    .map(|d| topology.retry_queue(*d)),
            );
            for q in queues {
                let _ = ch
                    .queue_delete(
                        q.as_str().into(),
                        lapin::options::QueueDeleteOptions::default(),
                    )
                    .await;
            }
            let _ = ch
                .exchange_delete(
                    topology.exchange().into(),
                    lapin::options::ExchangeDeleteOptions::default(),
                )
                .await;
            let _ = conn.close(200, "cleanup".into()).await;
        }
        let base = std::env::var("TEST_DATABASE_BASE")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
        if let Ok(pool) = sqlx::PgPool::connect(&format!("{base}/postgres")).await {
            let drop = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.database);
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(drop))
                .execute(&pool)
                .await;
            pool.close().await;
        }
    }
}
