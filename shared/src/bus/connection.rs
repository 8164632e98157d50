//! [`Bus`]: a connection to any node of the cluster that answers, replaced
//! when lost.

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use lapin::{Channel, Connection, ConnectionProperties};
use rand::seq::SliceRandom;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::BusError;
use crate::config::redact;

/// How long opening a channel, or turning on a publisher's confirms on it, may take
/// (normally milliseconds).
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long setting up on a fresh channel may take as a whole: opening it,
/// declaring the topology and, in the worker, starting the consumer (quorum
/// queues are declared through their Raft log, slower on a cluster that lost
/// a node).
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// The backoff between attempts to reach the broker again (a connection, a
/// consumer): jittered, 200 ms growing to 5 s, for as long as it takes.
pub fn reconnect_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_jitter()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .without_max_times()
}

/// A connection to one node of the cluster named by `AMQP_URL`, re-made on
/// another node when it is lost.
#[derive(Debug)]
pub struct Bus {
    urls: Vec<String>,
    name: String,
    connection: Mutex<Option<Arc<Connection>>>,
    shutdown: CancellationToken,
}

impl Bus {
    /// Connects to one of `urls` (shuffled, so clients spread over the nodes),
    /// retrying with backoff until a node answers or `shutdown` fires.
    /// `name` shows in the RabbitMQ management UI.
    pub async fn connect(
        urls: &[String],
        name: &str,
        shutdown: &CancellationToken,
    ) -> Result<Arc<Self>, BusError> {
        let bus = Arc::new(Self {
            urls: urls.to_vec(),
            name: name.to_owned(),
            connection: Mutex::new(None),
            shutdown: shutdown.clone(),
        });
        bus.connection().await?;
        Ok(bus)
    }

    /// Tries each node once, in shuffled order, and gives up (for the CLI,
    /// which should fail fast with exit 1 rather than wait forever).
    pub async fn connect_once(urls: &[String], name: &str) -> Result<Arc<Self>, BusError> {
        let connection = connect_any(urls, name).await?;
        Ok(Arc::new(Self {
            urls: urls.to_vec(),
            name: name.to_owned(),
            connection: Mutex::new(Some(Arc::new(connection))),
            shutdown: CancellationToken::new(),
        }))
    }

    /// The live connection, reconnecting (with backoff, to any node) when it was lost.
    pub async fn connection(&self) -> Result<Arc<Connection>, BusError> {
        let mut slot = self.connection.lock().await;
        if let Some(conn) = slot.as_ref()
            && conn.status().connected()
        {
            return Ok(conn.clone());
        }
        let attempt = || connect_any(&self.urls, &self.name);
        let retry = attempt.retry(reconnect_backoff()).notify(|e, wait| {
            tracing::warn!(error = %e, retry_in = ?wait, "RabbitMQ unreachable, retrying");
        });
        let conn = tokio::select! {
            conn = retry => conn?,
            () = self.shutdown.cancelled() => return Err(BusError::Cancelled),
        };
        let conn = Arc::new(conn);
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// A fresh channel on the live connection, within [`OPEN_TIMEOUT`].
    pub async fn channel(&self) -> Result<Channel, BusError> {
        let conn = self.connection().await?;
        let opened = match tokio::time::timeout(OPEN_TIMEOUT, conn.create_channel()).await {
            Ok(Ok(ch)) => return Ok(ch),
            Ok(Err(e)) => e.into(),
            Err(_) => BusError::TimedOut {
                what: "opening a channel",
                after: OPEN_TIMEOUT,
            },
        };
        // The connection looked alive but is not: forget it so the next call
        // reconnects.
        self.forget_if(Some(&conn)).await;
        Err(opened)
    }

    /// Runs `work` on this bus, giving up after `after`: then the connection
    /// it started on is forgotten, so whatever retries opens a fresh one.
    ///
    /// Every wait for a broker's answer is bounded: in the cluster test a
    /// worker whose node was killed reconnected, then waited for ever on a
    /// channel that never opened on the new connection (no error, no channel
    /// on the broker, ten minutes), and every publish queued behind it.
    pub async fn within<T, E: From<BusError>>(
        &self,
        what: &'static str,
        after: Duration,
        work: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        // The connection the work will use: the live one now, or, when there
        // is none (or it is lost), whichever the work's own reconnection puts
        // in the slot, so then the current one is forgotten.
        let started_on = self
            .connection
            .lock()
            .await
            .clone()
            .filter(|conn| conn.status().connected());
        match tokio::time::timeout(after, work).await {
            Ok(result) => result,
            Err(_) => {
                self.forget_if(started_on.as_ref()).await;
                Err(BusError::TimedOut { what, after }.into())
            }
        }
    }

    /// Forgets the current connection (it failed); the next call reconnects.
    pub async fn forget(&self) {
        *self.connection.lock().await = None;
    }

    /// Runs `work` on a channel of its own, closed after (declaring the
    /// topology at start, or again after an outage), all of it within
    /// [`SETUP_TIMEOUT`] (see [`Bus::within`]).
    pub async fn set_up<T, E: From<BusError>>(
        &self,
        what: &'static str,
        work: impl AsyncFnOnce(&Channel) -> Result<T, E>,
    ) -> Result<T, E> {
        let steps = async {
            let channel = self.channel().await?;
            let done = work(&channel).await;
            // Closed on failure too: a step retried after an outage must not
            // leave a channel open per attempt.
            let _ = channel.close(200, "set up".into()).await;
            done
        };
        self.within(what, SETUP_TIMEOUT, steps).await
    }

    /// Forgets the connection only if it is still `failed` (`None`: whichever
    /// it is): one that another task has made since is left alone.
    async fn forget_if(&self, failed: Option<&Arc<Connection>>) {
        let mut slot = self.connection.lock().await;
        let same = match (slot.as_ref(), failed) {
            (Some(now), Some(failed)) => Arc::ptr_eq(now, failed),
            (_, None) => true,
            (None, Some(_)) => false,
        };
        if same {
            *slot = None;
        }
    }

    /// Closes the connection (at shutdown).
    pub async fn close(&self) {
        if let Some(conn) = self.connection.lock().await.take() {
            let _ = conn.close(200, "shutdown".into()).await;
        }
    }
}

async fn connect_any(urls: &[String], name: &str) -> Result<Connection, BusError> {
    let mut order: Vec<&String> = urls.iter().collect();
    order.shuffle(&mut rand::rng());
    let mut last = None;
    for url in &order {
        tracing::info!(url = %redact(url), "connecting to RabbitMQ");
        let props = ConnectionProperties::default().with_connection_name(name.into());
        match tokio::time::timeout(Duration::from_secs(10), Connection::connect(url, props)).await {
            Ok(Ok(conn)) => {
                tracing::info!(url = %redact(url), "connected to RabbitMQ");
                return Ok(conn);
            }
            Ok(Err(e)) => {
                tracing::warn!(url = %redact(url), error = %e, "RabbitMQ node did not answer");
                last = Some(e);
            }
            Err(_) => {
                tracing::warn!(url = %redact(url), "RabbitMQ node timed out");
                last = Some(lapin::Error::from(
                    lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed),
                ));
            }
        }
    }
    let tried = order
        .iter()
        .map(|u| redact(u))
        .collect::<Vec<_>>()
        .join(", ");
    Err(BusError::Unreachable {
        tried,
        last: last.unwrap_or_else(|| {
            lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(
                lapin::ConnectionState::Closed,
            ))
        }),
    })
}
