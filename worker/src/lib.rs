//! The verimail worker: consumes verification requests, throttles, signs,
//! renders, sends, and publishes exactly one outcome per request.
//!
//! [`Worker::build`] connects to PostgreSQL and RabbitMQ, declares the
//! topology, loads the templates, builds the mailer and binds `METRICS_ADDR`;
//! [`Worker::run`] consumes until its token is cancelled, then drains.
//! `main.rs` and the tests go through the same two calls.
//!
//! - [`consume`]: the consumer loop, one task per delivery, reconnections.
//! - [`process`]: one delivery's state machine, from bytes to acknowledgement.
//! - [`store`]: every SQL statement; [`batch`]: group commit of concurrent
//!   deliveries' statements; [`throttle`]: the throttle's rules.
//! - [`retry`]: retry-queue routing and dead-letter headers.
//! - [`mail`]: templates and delivery; [`health`], [`metrics`]: ops endpoints.

pub mod batch;
pub mod consume;
pub mod health;
pub mod mail;
pub mod metrics;
pub mod process;
pub mod retry;
pub mod store;
pub mod throttle;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};
use verimail_shared::bus::{Bus, BusError, Publisher, Topology};

use verimail_shared::bus::declare;
use verimail_shared::config::Config;
use verimail_shared::db::{self, DbError, PoolSettings};
use verimail_shared::token::Signer;

use crate::health::Health;
use crate::mail::{Mailer, MailerError, TemplateError, Templates};
use crate::process::Ctx;
use crate::store::{BatchedStore, Store};

/// How long a claim holds a request: longer than a send with its in-process
/// retries, so only a crashed worker's lease ever runs out.
pub const LEASE: Duration = Duration::from_secs(60);
/// How long in-flight deliveries may take to finish at shutdown before they
/// are handed back to the broker unacknowledged.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);
/// How often the retention sweep runs.
const RETENTION_EVERY: Duration = Duration::from_secs(300);

/// Why the worker could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is incomplete (e.g. no secret key).
    #[error(transparent)]
    Config(#[from] verimail_shared::ConfigError),
    /// PostgreSQL could not be reached, created or migrated.
    #[error(transparent)]
    Database(#[from] DbError),
    /// RabbitMQ could not be reached.
    #[error("RabbitMQ: {0}")]
    Bus(#[from] BusError),
    /// Declaring the exchange and queues failed (e.g. a queue exists with other arguments).
    #[error("declaring the RabbitMQ topology failed: {0}")]
    Declare(#[source] lapin::Error),
    /// A template is broken (`TEMPLATES_DIR`).
    #[error("TEMPLATES_DIR: {0}")]
    Templates(#[from] TemplateError),
    /// The mail transport could not be built.
    #[error(transparent)]
    Mailer(#[from] MailerError),
    /// The namespace's send budget (`MAIL_RATE_LIMIT`) could not be set up in PostgreSQL.
    #[error("MAIL_RATE_LIMIT: setting up the shared budget failed: {0}")]
    Coordinate(#[source] sqlx::Error),
    /// `METRICS_ADDR` could not be bound.
    #[error("METRICS_ADDR: cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A worker ready to run.
#[derive(Debug)]
pub struct Worker {
    ctx: Arc<Ctx>,
    bus: Arc<Bus>,
    listener: TcpListener,
    metrics_addr: SocketAddr,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
}

impl Worker {
    /// Connects, declares, loads and binds everything; any failure here is a
    /// startup error (a broken template included). Waits for RabbitMQ to
    /// answer, retrying with backoff.
    pub async fn build(config: Config) -> Result<Self, Error> {
        Self::build_with_lease(config, LEASE).await
    }

    /// [`Worker::build`] with another lease than [`LEASE`] (tests of the
    /// crash windows, which cannot wait a minute).
    pub async fn build_with_lease(config: Config, lease: Duration) -> Result<Self, Error> {
        let keys = config.keys()?;
        let signer = Signer::new(&keys, config.itsdangerous_digest);
        let templates = Templates::load(config.templates_dir.as_deref())?;
        let mailer = Mailer::from_config(&config)?;
        let listener = TcpListener::bind(config.metrics_addr)
            .await
            .map_err(|source| Error::Listen {
                addr: config.metrics_addr,
                source,
            })?;
        let metrics_addr = listener.local_addr().map_err(|source| Error::Listen {
            addr: config.metrics_addr,
            source,
        })?;
        let metrics = metrics::handle();

        // The common path (claim, conclusion, mark) runs batched on the
        // batching task's own connection (`store::BatchedStore`, at most
        // `batch::IN_FLIGHT` rounds at once); the pool
        // serves the rest (duplicates, throttled requests, retries, readiness)
        // and the fallback when a batch fails, so an eighth of the
        // concurrency is plenty.
        let max_connections = u32::from(config.worker_concurrency / 8).clamp(2, 8);
        let settings = PoolSettings {
            max_connections,
            acquire_timeout: Duration::from_secs(3),
        };
        // An unreachable database at start is waited for (as RabbitMQ is), so
        // a database restart does not put the worker into a crash loop; a bad
        // URL, refused credentials or a failed migration stop it at once.
        let url = &config.database_url;
        let pool = (|| {
            db::connect_with_deadlines(url, config.auto_migrate, settings, store::deadlines())
        })
        .retry(
            ExponentialBuilder::default()
                .with_jitter()
                .with_min_delay(Duration::from_millis(250))
                .with_max_delay(Duration::from_secs(5))
                .without_max_times(),
        )
        .when(|e| {
            matches!(
                e,
                DbError::Connect(sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut)
            )
        })
        .notify(|e, wait| warn!(error = %e, retry_in = ?wait, "PostgreSQL unreachable, retrying"))
        .await?;

        // Cancelled only after draining (or when the drain deadline passes):
        // reconnections and publishes keep working while in-flight work finishes.
        let hard_stop = CancellationToken::new();
        // The namespace in the connection name tells deployments apart in the
        // management UI.
        let name = format!("verimail-worker {}", config.namespace);
        let bus = Bus::connect(&config.amqp_urls, &name, &hard_stop).await?;
        let topology = Topology::new(config.namespace.clone());
        // Bounded: a broker that stops answering here would leave the worker
        // started and never ready.
        bus.set_up("declaring the topology", async |channel| {
            declare(channel, &topology).await.map_err(Error::Declare)
        })
        .await?;

        let health = Arc::new(Health::default());
        health.set_db(true);
        health.set_bus(true);
        let mailer = mailer
            .coordinate(pool.clone(), &config)
            .await
            .map_err(Error::Coordinate)?;
        let store = Store::new(pool, lease);
        let ctx = Arc::new(Ctx {
            batches: BatchedStore::spawn(store.clone(), health.clone()),
            store,
            publisher: Publisher::new(bus.clone()),
            topology,
            templates,
            mailer,
            signer,
            health,
            hard_stop,
            in_flight: Default::default(),
            config,
        });
        info!(
            metrics_addr = %metrics_addr,
            namespace = %ctx.config.namespace,
            runtime_threads = tokio::runtime::Handle::current().metrics().num_workers(),
            "worker ready"
        );
        Ok(Self {
            ctx,
            bus,
            listener,
            metrics_addr,
            metrics,
        })
    }

    /// Where `/metrics`, `/healthz` and `/readyz` answer (the bound port when
    /// `METRICS_ADDR` asked for port 0).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// Consumes until `shutdown` is cancelled; then stops consuming, lets
    /// in-flight deliveries finish (at most [`DRAIN_TIMEOUT`]), hands back the
    /// rest and closes the connection.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let Self {
            ctx,
            bus,
            listener,
            metrics,
            ..
        } = self;
        let hard_stop = ctx.hard_stop.clone();
        let router = health::router(ctx.health.clone(), metrics);
        let server = tokio::spawn(
            axum::serve(listener, router)
                .with_graceful_shutdown(hard_stop.clone().cancelled_owned())
                .into_future(),
        );
        let probe = tokio::spawn(health::probe(
            ctx.health.clone(),
            ctx.store.pool().clone(),
            bus.clone(),
            hard_stop.clone(),
        ));

        // Keeps the tables small: old request, throttle and confirmation
        // records go in small batches (RETENTION_HOURS).
        let retention = tokio::spawn(verimail_shared::retention::run(
            ctx.store.pool().clone(),
            ctx.config.retention,
            RETENTION_EVERY,
            hard_stop.clone(),
        ));

        let tracker = TaskTracker::new();
        // The consumer loop runs as a task, on the runtime's worker threads:
        // awaited here it would run on the main thread (`block_on`), and every
        // delivery would wake that thread, one more context switch per message.
        let channel = tokio::spawn(consume::consume(
            ctx.clone(),
            bus.clone(),
            ctx.config.worker_concurrency,
            shutdown,
            tracker.clone(),
        ))
        .await
        .unwrap_or_else(|e| match e.try_into_panic() {
            // A bug in the loop: fail as loudly as when it ran inline.
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => {
                warn!(error = %e, "the consumer task was cancelled");
                None
            }
        });
        tracker.close();
        info!(in_flight = tracker.len(), "draining in-flight requests");
        if tokio::time::timeout(DRAIN_TIMEOUT, tracker.wait())
            .await
            .is_err()
        {
            warn!(
                in_flight = tracker.len(),
                "in-flight requests did not finish in time; handing them back"
            );
            hard_stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
        }
        if let Some(channel) = channel {
            // Whatever is still unacknowledged goes back to the queue.
            let _ = channel.close(200, "shutdown".into()).await;
        }
        hard_stop.cancel();
        bus.close().await;
        let _ = probe.await;
        let _ = retention.await;
        match server.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "metrics server failed"),
            Err(e) => warn!(error = %e, "metrics server task failed"),
        }
        ctx.store.pool().close().await;
        info!("worker stopped");
        Ok(())
    }
}
