//! What every delivery task shares, and the in-process hold on a request id
//! that keeps two copies of one request of this process apart.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use verimail_shared::bus::{Publisher, Topology};
use verimail_shared::config::Config;
use verimail_shared::token::Signer;

use crate::health::Health;
use crate::mail::{Mailer, Templates};
use crate::store::{BatchedStore, Store};

/// What every delivery task shares.
#[derive(Debug)]
pub struct Ctx {
    /// The configuration.
    pub config: Config,
    /// Names of exchange and queues.
    pub topology: Topology,
    /// The worker's tables.
    pub store: Store,
    /// Batched claims, conclusions and published marks.
    pub batches: BatchedStore,
    /// Confirmed publishing.
    pub publisher: Publisher,
    /// Mail templates.
    pub templates: Templates,
    /// Mail transport.
    pub mailer: Mailer,
    /// Token minting.
    pub signer: Signer,
    /// Readiness.
    pub health: Arc<Health>,
    /// Cancelled when in-flight work must stop (the shutdown deadline passed):
    /// tasks then leave their delivery unacknowledged for the broker to hand back.
    pub hard_stop: CancellationToken,
    /// Request ids a delivery of this process holds right now: a copy of one
    /// (redelivered, or published twice) is never claimed beside it, even
    /// once the lease ran out during a database outage. (foldhash: two
    /// look-ups a mail, where std's SipHash cost more than the set's work.)
    pub in_flight: std::sync::Mutex<foldhash::HashSet<String>>,
}

/// A request id held in [`Ctx::in_flight`] until dropped.
pub(super) struct Holding<'a> {
    ctx: &'a Ctx,
    id: String,
}

impl<'a> Holding<'a> {
    /// Holds `id`, or `None` when another delivery of this process holds it.
    pub(super) fn take(ctx: &'a Ctx, id: &str) -> Option<Self> {
        let mut held = ctx
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        held.insert(id.to_owned()).then(|| Self {
            ctx,
            id: id.to_owned(),
        })
    }
}

impl<'a> Holding<'a> {
    /// Holds `id`, waiting up to [`HOLD_WAIT`] for another delivery of this
    /// process to let go of it (a copy that found the request finished is
    /// done in milliseconds); `None` when it still holds it (it is sending).
    pub(super) async fn wait_for(ctx: &'a Ctx, id: &str) -> Option<Self> {
        let deadline = Instant::now() + HOLD_WAIT;
        loop {
            if let Some(holding) = Self::take(ctx, id) {
                return Some(holding);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// How long a copy of a request waits for another delivery of this process
/// to let go of it before it goes to the retry queue.
const HOLD_WAIT: Duration = Duration::from_secs(1);

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        self.ctx
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.id);
    }
}
