//! `verimail-gateway`: serves `/confirm/{token}`, records each confirmation in
//! PostgreSQL together with its `verimail.email.verified` event (a transactional
//! outbox), and relays the events to RabbitMQ with publisher confirms.
//!
//! Map:
//! - [`routes`]: the router and the `/confirm` handler; [`answer`]: statuses,
//!   the status → HTTP code mapping and rendering; [`pages`]: the HTML.
//! - [`client`]: client address behind trusted proxies and the rate limiter.
//! - [`webhooks`]: the providers' bounce and complaint notifications
//!   (signatures, payloads, recording with the suppression and the event);
//!   `routes::suppressions`: the suppression list over the API.
//! - [`writer`]: group commit of confirmations (one statement per batch);
//!   [`store`]: SQL; [`outbox`]: the relay; [`metrics`]: Prometheus.
//!
//! Invariants: the gateway never sends mail; a click never waits for the
//! broker; no input makes `/confirm` answer 5xx, only a database outage (503).

pub mod answer;
pub mod client;
pub mod metrics;
pub mod outbox;
pub mod pages;
pub mod routes;
pub mod store;
pub mod webhooks;
pub mod writer;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use backon::{ConstantBuilder, Retryable};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;
use verimail_shared::bus::{Bus, Topology};
use verimail_shared::token::Signer;
use verimail_shared::{Config, ConfigError, db};

pub use answer::{Reply, Status};
pub use routes::{ops_router, router};

/// Connections the gateway's pool opens at most.
pub const POOL_SIZE: u32 = 16;
/// How long a request waits for a pool connection (part of the 5 s promise).
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// Server-side limit on any one statement (part of the 5 s promise).
pub const STATEMENT_TIMEOUT_MS: u32 = 3000;
/// Each readiness probe of the database and the broker gives up after this.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a stopping server waits for open connections to finish.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

/// The broker connection, filled in by a background task once RabbitMQ
/// answers: the gateway serves clicks without it (they only need PostgreSQL).
#[derive(Debug, Clone)]
pub struct BusSlot(Arc<watch::Sender<Option<Arc<Bus>>>>);

impl Default for BusSlot {
    fn default() -> Self {
        Self::empty()
    }
}

impl BusSlot {
    /// No broker yet.
    pub fn empty() -> Self {
        Self(Arc::new(watch::Sender::new(None)))
    }

    /// A slot holding `bus`.
    pub fn with(bus: Arc<Bus>) -> Self {
        let slot = Self::empty();
        slot.set(bus);
        slot
    }

    /// Stores the connected bus.
    pub fn set(&self, bus: Arc<Bus>) {
        self.0.send_replace(Some(bus));
    }

    /// The bus, if connected once.
    pub fn get(&self) -> Option<Arc<Bus>> {
        self.0.borrow().clone()
    }

    /// Connects in the background (retrying until `shutdown`), declares the
    /// topology, then fills the slot.
    pub fn connect_in_background(
        &self,
        urls: Vec<String>,
        topology: Topology,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) {
        let slot = self.clone();
        tracker.spawn(async move {
            let Ok(bus) = Bus::connect(&urls, "verimail-gateway", &shutdown).await else {
                return;
            };
            // Declare what we publish to; retried, since a channel can fail too.
            let declare = || outbox::redeclare(&bus, &topology);
            let attempts = declare
                .retry(
                    ConstantBuilder::default()
                        .with_delay(Duration::from_secs(2))
                        .without_max_times(),
                )
                .notify(
                    |e, _| tracing::warn!(error = %e, "declaring the topology failed, retrying"),
                );
            tokio::select! {
                () = shutdown.cancelled() => return,
                declared = attempts => if declared.is_err() { return },
            }
            slot.set(bus);
        });
    }
}

/// What `/readyz` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    /// PostgreSQL answered `SELECT 1` within [`PROBE_TIMEOUT`].
    pub database: bool,
    /// RabbitMQ is connected.
    pub broker: bool,
}

impl Readiness {
    /// Both are reachable.
    pub fn ready(self) -> bool {
        self.database && self.broker
    }
}

/// Everything a request handler needs; cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: PgPool,
    signer: Signer,
    config: Config,
    topology: Topology,
    limiter: client::RateLimiter,
    metrics: metrics::Metrics,
    bus: BusSlot,
    /// Wakes the outbox relay after a confirmation.
    outbox_wake: Arc<Notify>,
    /// Records confirmations in batches (group commit).
    writer: writer::Writer,
    pages: pages::Pages,
    /// `GATEWAY_API_KEYS`, for `/v1/` (constant-time checks).
    api_keys: verimail_shared::token::ApiKeys,
    /// The Content-Security-Policy header, built once from the allowlist.
    csp: axum::http::HeaderValue,
    /// SNS signing certificates, and the fetcher that confirms subscriptions.
    sns: webhooks::sns::CertCache,
}

impl AppState {
    /// State for `config` on `pool`; the signing keys are required.
    pub fn new(config: &Config, pool: PgPool, bus: BusSlot) -> Result<Self, ConfigError> {
        Self::with_fetch(
            config,
            pool,
            bus,
            Arc::new(webhooks::sns::HttpsFetch::default()),
        )
    }

    /// [`AppState::new`] with the fetcher of SNS URLs (certificates,
    /// subscription confirmations) given: tests watch what is fetched.
    pub fn with_fetch(
        config: &Config,
        pool: PgPool,
        bus: BusSlot,
        fetch: Arc<dyn webhooks::sns::Fetch>,
    ) -> Result<Self, ConfigError> {
        let keys = config.keys()?;
        let outbox_wake = Arc::new(Notify::new());
        let metrics = metrics::Metrics::new();
        Ok(Self {
            inner: Arc::new(Inner {
                signer: Signer::new(&keys, config.itsdangerous_digest),
                limiter: client::RateLimiter::new(config.confirm_rate_limit_per_minute),
                topology: Topology::new(config.namespace.clone()),
                config: config.clone(),
                writer: writer::Writer::new(pool.clone(), outbox_wake.clone(), metrics.clone()),
                pool,
                metrics,
                bus,
                outbox_wake,
                pages: pages::Pages::new(),
                api_keys: config.api_keys(),
                csp: routes::csp(&config.return_url_allowlist),
                sns: webhooks::sns::CertCache::new(fetch),
            }),
        })
    }

    /// The database pool.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The signer (tests mint tokens with it).
    pub fn signer(&self) -> &Signer {
        &self.inner.signer
    }

    /// The broker slot.
    pub fn bus(&self) -> &BusSlot {
        &self.inner.bus
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &metrics::Metrics {
        &self.inner.metrics
    }

    /// The outbox relay for this state (run it with [`outbox::Relay::run`]).
    pub fn relay(&self) -> outbox::Relay {
        outbox::Relay {
            pool: self.inner.pool.clone(),
            bus: self.inner.bus.clone(),
            topology: self.inner.topology.clone(),
            wake: self.inner.outbox_wake.clone(),
            metrics: self.inner.metrics.clone(),
            poll: outbox::POLL,
            retention: self.inner.config.retention,
        }
    }

    /// Probes PostgreSQL and RabbitMQ, each within [`PROBE_TIMEOUT`], concurrently.
    pub async fn readiness(&self) -> Readiness {
        let database = db::is_reachable(&self.inner.pool, PROBE_TIMEOUT);
        let broker = async {
            let Some(bus) = self.inner.bus.get() else {
                return false;
            };
            // `connection()` reconnects (and waits) when the broker was lost;
            // not answering within the probe timeout means not ready.
            matches!(
                tokio::time::timeout(PROBE_TIMEOUT, bus.connection()).await,
                Ok(Ok(conn)) if conn.status().connected()
            )
        };
        let (database, broker) = tokio::join!(database, broker);
        Readiness { database, broker }
    }
}

/// Failures starting or running the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A configuration variable is wrong or missing.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The database could not be prepared.
    #[error(transparent)]
    Db(#[from] db::DbError),
    /// `GATEWAY_ADDR` could not be bound.
    #[error("GATEWAY_ADDR: cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `METRICS_ADDR` could not be bound.
    #[error("METRICS_ADDR: cannot listen on {addr}: {source}")]
    BindMetrics {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The server failed.
    #[error("server failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// The pool the gateway uses: short acquire timeout and a server-side
/// statement timeout, so a sick database answers 503 within 5 seconds.
pub async fn connect_pool(config: &Config) -> Result<PgPool, db::DbError> {
    let options: PgConnectOptions = config.database_url.parse().map_err(db::DbError::Url)?;
    let options = options.options([("statement_timeout", STATEMENT_TIMEOUT_MS.to_string())]);
    db::ensure_database(&options).await?;
    let pool = PgPoolOptions::new()
        .max_connections(POOL_SIZE)
        .min_connections(1)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        // A broken connection fails its query and is replaced; checking each
        // one before use would cost a round trip per click.
        .test_before_acquire(false)
        .connect_with(options)
        .await
        .map_err(db::DbError::Connect)?;
    if config.auto_migrate {
        db::migrate(&pool).await?;
    }
    Ok(pool)
}

/// A gateway bound to its address, ready to [`run`](Gateway::run).
#[derive(Debug)]
pub struct Gateway {
    listener: TcpListener,
    /// `/healthz`, `/readyz` and `/metrics` (`METRICS_ADDR`).
    ops_listener: TcpListener,
    state: AppState,
    /// Stops the background tasks (broker connection, relay).
    tasks_stop: CancellationToken,
    tracker: TaskTracker,
    /// Stops the background tasks if the gateway is dropped without running.
    _guard: DropGuard,
}

impl Gateway {
    /// Connects to PostgreSQL (creating and migrating the database), starts
    /// connecting to RabbitMQ in the background and binds `GATEWAY_ADDR` and
    /// `METRICS_ADDR` (port 0 picks a free port; see [`Gateway::local_addr`]
    /// and [`Gateway::metrics_addr`]).
    pub async fn build(config: Config) -> Result<Self, GatewayError> {
        // Keys first: a missing secret is a configuration error, before any I/O.
        config.keys()?;
        let pool = connect_pool(&config).await?;
        let listener = TcpListener::bind(config.gateway_addr)
            .await
            .map_err(|source| GatewayError::Bind {
                addr: config.gateway_addr,
                source,
            })?;
        let ops_listener = TcpListener::bind(config.gateway_metrics_addr)
            .await
            .map_err(|source| GatewayError::BindMetrics {
                addr: config.gateway_metrics_addr,
                source,
            })?;
        let tasks_stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let bus = BusSlot::empty();
        bus.connect_in_background(
            config.amqp_urls.clone(),
            Topology::new(config.namespace.clone()),
            tasks_stop.clone(),
            &tracker,
        );
        let state = AppState::new(&config, pool, bus)?;
        Ok(Self {
            listener,
            ops_listener,
            state,
            _guard: tasks_stop.clone().drop_guard(),
            tasks_stop,
            tracker,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        // A bound listener always has an address; the fallback is unreachable.
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The bound address of `/healthz`, `/readyz` and `/metrics`.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.ops_listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The shared state (tests read the pool and signer from it).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown`: stops accepting, lets requests in flight
    /// finish (at most [`DRAIN_TIMEOUT`]), then stops the relay after a last
    /// flush of the outbox, and closes the broker and database connections.
    /// The operational endpoints answer until the public server has drained.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), GatewayError> {
        let Self {
            listener,
            ops_listener,
            state,
            tasks_stop,
            tracker,
            _guard,
        } = self;
        tracker.spawn(state.relay().run(tasks_stop.clone()));
        let addr = listener.local_addr().ok();
        let metrics_addr = ops_listener.local_addr().ok();
        tracing::info!(addr = ?addr, metrics_addr = ?metrics_addr, "gateway listening");
        let ops_stop = CancellationToken::new();
        let mut ops = {
            let stop = ops_stop.clone();
            let app = ops_router(state.clone());
            tokio::spawn(async move {
                axum::serve(ops_listener, app)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await
            })
        };
        let app = router(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
        let stop = shutdown.clone();
        let server = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .into_future();
        tokio::pin!(server);
        let result = tokio::select! {
            r = &mut server => r,
            () = async {
                shutdown.cancelled().await;
                tokio::time::sleep(DRAIN_TIMEOUT).await;
            } => {
                tracing::warn!("connections still open after the drain timeout; closing");
                Ok(())
            }
        };
        ops_stop.cancel();
        // A probe or scrape in flight ends within the router's timeout.
        match tokio::time::timeout(routes::REQUEST_TIMEOUT, &mut ops).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "the metrics server failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "the metrics server task failed"),
            Ok(Ok(Ok(()))) => {}
            Err(_) => ops.abort(),
        }
        tasks_stop.cancel();
        tracker.close();
        tracker.wait().await;
        if let Some(bus) = state.bus().get() {
            bus.close().await;
        }
        state.pool().close().await;
        tracing::info!("gateway stopped");
        result.map_err(GatewayError::Serve)
    }
}
