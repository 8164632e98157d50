//! [`Producer`]: publishes verification requests with publisher confirms.

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use url::Origin;
use verimail_shared::Config;
use verimail_shared::bus::{Bus, BusError, Outgoing, Publisher, Topology};
use verimail_shared::events::VERIFICATION_REQUESTED;

use crate::request::{InvalidRequest, VerificationRequest, validate_body};

/// The CloudEvent `source` of requests unless the caller names its own.
pub const DEFAULT_SOURCE: &str = "/verimail/producer";

/// How many times [`Producer::request_verification`] publishes before giving up.
const PUBLISH_ATTEMPTS: usize = 5;

/// Why a request was not published.
#[derive(Debug, thiserror::Error)]
pub enum ProducerError {
    /// A field breaks the contract's rules; nothing was published.
    #[error("invalid request: {0}")]
    Invalid(#[from] InvalidRequest),
    /// The broker could not be reached, refused the message, or returned it.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// Declaring the exchange and queues failed.
    #[error("declaring the topology failed: {0}")]
    Declare(#[source] lapin::Error),
    /// No confirm arrived within the publish timeout (through every retry).
    #[error("the broker did not confirm within {0:?}")]
    Timeout(Duration),
}

impl ProducerError {
    /// The field at fault, for [`ProducerError::Invalid`].
    pub fn invalid_field(&self) -> Option<&'static str> {
        match self {
            Self::Invalid(e) => Some(e.field),
            _ => None,
        }
    }
}

/// Publishes `verimail.verification.requested` events to the namespace's
/// exchange, persistent and mandatory, and reports success only once the
/// broker has confirmed them.
///
/// One `Producer` per process is enough: it is `Sync`, publishes concurrently
/// and reconnects (to any node of `AMQP_URL`) when its connection is lost.
///
/// ```no_run
/// use verimail_producer::{Config, Producer, VerificationRequest};
///
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// let config = Config::from_env()?;
/// let producer = Producer::connect(&config).await?.with_source("/accounts");
/// let id = producer
///     .request_verification(VerificationRequest::new("42", "alice@example.com").locale("en"))
///     .await?;
/// println!("requested {id}");
/// producer.close().await;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Producer {
    publisher: Publisher,
    topology: Topology,
    /// `Some` when `RETURN_URL_ALLOWLIST` is set here; otherwise the worker alone checks.
    allowlist: Option<Vec<Origin>>,
    source: String,
    publish_timeout: Duration,
    /// Cancels the bus's endless reconnect loop when the producer is closed.
    shutdown: CancellationToken,
}

impl Producer {
    /// Connects to one of the nodes in `config.amqp_urls` (retrying with
    /// backoff until one answers) and declares the topology, idempotently.
    pub async fn connect(config: &Config) -> Result<Self, ProducerError> {
        Self::connect_as(config, "verimail-producer").await
    }

    /// Like [`Producer::connect`], naming the connection (it shows in the
    /// RabbitMQ management UI: name it after your service).
    pub async fn connect_as(config: &Config, connection_name: &str) -> Result<Self, ProducerError> {
        let shutdown = CancellationToken::new();
        let bus = Bus::connect(&config.amqp_urls, connection_name, &shutdown).await?;
        Self::with_bus(bus, config, shutdown).await
    }

    /// Like [`Producer::connect`], but tries each node once and fails fast
    /// (for command-line tools).
    pub async fn connect_once(config: &Config) -> Result<Self, ProducerError> {
        let bus = Bus::connect_once(&config.amqp_urls, "verimail-cli").await?;
        Self::with_bus(bus, config, CancellationToken::new()).await
    }

    async fn with_bus(
        bus: Arc<Bus>,
        config: &Config,
        shutdown: CancellationToken,
    ) -> Result<Self, ProducerError> {
        let topology = Topology::new(config.namespace.clone());
        bus.set_up("declaring the topology", async |channel| {
            verimail_shared::bus::declare(channel, &topology)
                .await
                .map_err(ProducerError::Declare)
        })
        .await?;
        let allowlist =
            (!config.return_url_allowlist.is_empty()).then(|| config.return_url_allowlist.clone());
        Ok(Self {
            publisher: Publisher::new(bus),
            topology,
            allowlist,
            source: DEFAULT_SOURCE.into(),
            publish_timeout: Duration::from_secs(30),
            shutdown,
        })
    }

    /// Sets the CloudEvent `source` of requests that do not name their own
    /// (your service, e.g. `/accounts`).
    pub fn with_source(mut self, source: impl Into<String>) -> Self {
        self.source = source.into();
        self
    }

    /// Bounds how long [`Producer::request_verification`] tries, retries and
    /// reconnects included (default 30 seconds).
    pub fn with_publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// The exchange and queue names of the configured namespace.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Checks `request` with the worker's rules (and, when `RETURN_URL_ALLOWLIST`
    /// is set in this process's configuration, its allowlist) without publishing.
    pub fn validate(&self, request: &VerificationRequest) -> Result<(), InvalidRequest> {
        let body = self.body(request, OffsetDateTime::now_utc());
        validate_body(&body, self.allowlist.as_deref()).map(|_| ())
    }

    fn body(&self, request: &VerificationRequest, now: OffsetDateTime) -> Vec<u8> {
        serde_json::to_vec(&request.to_cloudevent(&self.source, now)).unwrap_or_default()
    }

    /// Validates `request`, publishes it, waits for the broker's confirm and
    /// returns the event id (the request id every outcome names).
    ///
    /// Transient failures (a lost connection, a nack) are retried a few times
    /// with backoff and reconnection, always with the same event id, so a
    /// request published twice is still served once. A message returned as
    /// unroutable (the topology was deleted) is retried once after declaring
    /// the topology again.
    pub async fn request_verification(
        &self,
        request: VerificationRequest,
    ) -> Result<String, ProducerError> {
        let request = request.ensure_id();
        let body = self.body(&request, OffsetDateTime::now_utc());
        let valid = validate_body(&body, self.allowlist.as_deref())?;
        let id = valid.id;
        let message = Outgoing::event(&self.topology, VERIFICATION_REQUESTED, &id, &body);

        let attempt = || async {
            match self.publisher.publish(&message).await {
                Err(BusError::Unroutable(why)) => {
                    // Someone deleted the queues: declare them again, then retry.
                    if let Ok(channel) = self.publisher.bus().channel().await {
                        let _ = verimail_shared::bus::declare(&channel, &self.topology).await;
                        let _ = channel.close(200, "declared".into()).await;
                    }
                    Err(BusError::Unroutable(why))
                }
                other => other,
            }
        };
        let retried = attempt
            .retry(
                ExponentialBuilder::default()
                    .with_jitter()
                    .with_min_delay(Duration::from_millis(100))
                    .with_max_delay(Duration::from_secs(2))
                    .with_max_times(PUBLISH_ATTEMPTS - 1),
            )
            .when(BusError::is_retryable)
            .notify(|e, wait| {
                tracing::warn!(error = %e, retry_in = ?wait, "publish failed, retrying");
            });
        tokio::select! {
            result = tokio::time::timeout(self.publish_timeout, retried) => match result {
                Ok(Ok(())) => Ok(id),
                Ok(Err(e)) => Err(e.into()),
                Err(_) => Err(ProducerError::Timeout(self.publish_timeout)),
            },
            () = self.shutdown.cancelled() => Err(BusError::Cancelled.into()),
        }
    }

    /// Stops reconnecting and closes the connection.
    pub async fn close(self) {
        self.shutdown.cancel();
        self.publisher.bus().close().await;
    }
}
