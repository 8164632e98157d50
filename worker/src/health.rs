//! `/healthz`, `/readyz` and `/metrics` on `METRICS_ADDR`.
//!
//! Readiness is kept by a background probe ([`probe`]) that asks the database
//! and the broker every second with a 2-second bound, so `/readyz` answers at
//! once and notices an outage within about 3 seconds; processing code also
//! reports database failures the moment it sees them, and the batching task
//! reports a round that ran out of time (stuck on a lock, or on a socket that
//! stopped answering) until one completes again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use verimail_shared::bus::Bus;

/// What `/readyz` reports: database and broker reachable, batches completing.
#[derive(Debug, Default)]
pub struct Health {
    db: AtomicBool,
    bus: AtomicBool,
    /// The database has answered once: only then is an answer "again".
    db_seen: AtomicBool,
    /// The last batch of some kind ran out of time (a lock, a statement
    /// timeout, a socket that stopped answering) and none completed since.
    stalled: AtomicBool,
    /// When the database last failed anyone here (`None`: never).
    last_db_failure: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Health {
    /// Ready: database and broker reachable, and batches complete.
    pub fn ready(&self) -> bool {
        self.db.load(Ordering::Relaxed)
            && self.bus.load(Ordering::Relaxed)
            && !self.stalled.load(Ordering::Relaxed)
    }

    /// Records whether batches stopped completing (a batch ran out of time)
    /// or complete again.
    pub fn set_batches_stalled(&self, stalled: bool) {
        let was = self.stalled.swap(stalled, Ordering::Relaxed);
        if was != stalled {
            if stalled {
                tracing::warn!("a batch ran out of time; its requests run alone");
            } else {
                tracing::info!("batches complete again");
            }
        }
    }

    /// Time since the database last failed (probe or statement), or
    /// [`Duration::MAX`] when it never did.
    pub fn since_db_failure(&self) -> Duration {
        let last = *self
            .last_db_failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        last.map_or(Duration::MAX, |t| t.elapsed())
    }

    /// Records whether the database answered.
    pub fn set_db(&self, up: bool) {
        if !up {
            *self
                .last_db_failure
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) =
                Some(std::time::Instant::now());
        }
        let was = self.db.swap(up, Ordering::Relaxed);
        if was != up {
            if up {
                if self.db_seen.swap(true, Ordering::Relaxed) {
                    tracing::info!("database reachable again");
                }
            } else {
                tracing::warn!("database unreachable");
            }
        }
    }

    /// Records whether the broker connection is up.
    pub fn set_bus(&self, up: bool) {
        let was = self.bus.swap(up, Ordering::Relaxed);
        if was != up && !up {
            tracing::warn!("broker connection lost");
        }
    }
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: PrometheusHandle,
}

/// The router of the ops endpoints.
pub fn router(health: Arc<Health>, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(AppState { health, metrics })
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.health.ready() {
        return (StatusCode::OK, "ready\n".to_owned());
    }
    // Says what is wrong, for the operator reading it.
    let h = &state.health;
    let mut why = Vec::new();
    if !h.db.load(Ordering::Relaxed) {
        why.push("database unreachable");
    }
    if !h.bus.load(Ordering::Relaxed) {
        why.push("broker unreachable");
    }
    if h.stalled.load(Ordering::Relaxed) {
        why.push("batches not completing");
    }
    let body = format!("not ready: {}\n", why.join(", "));
    (StatusCode::SERVICE_UNAVAILABLE, body)
}

async fn render_metrics(State(state): State<AppState>) -> impl IntoResponse {
    // Upkeep drains histogram buffers; cheap enough to run on each scrape.
    state.metrics.run_upkeep();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

/// Probes the database and the broker every second until `stop`.
pub async fn probe(health: Arc<Health>, pool: PgPool, bus: Arc<Bus>, stop: CancellationToken) {
    const BOUND: Duration = Duration::from_secs(2);
    loop {
        let db = verimail_shared::db::is_reachable(&pool, BOUND).await;
        health.set_db(db);
        let bus_up = matches!(
            tokio::time::timeout(BOUND, bus.connection()).await,
            Ok(Ok(conn)) if conn.status().connected()
        );
        health.set_bus(bus_up);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
