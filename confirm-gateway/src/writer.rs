//! Group commit of confirmations: clicks hand their confirmation to a writer
//! task, which records every confirmation waiting at that moment with one
//! lookup of their `requests` rows and ONE statement (the `confirmations` rows
//! and their outbox events together), then answers each click.
//!
//! Why: each commit costs PostgreSQL a WAL flush (an fsync) and a round trip
//! per statement; at thousands of clicks a second those, not the gateway's own
//! work, bound the throughput. A batch turns N commits into one.
//!
//! Invariants:
//! - a click hears `first = true` only after its confirmation AND its outbox
//!   row are committed (one statement: both or neither);
//! - one key confirms once: duplicates within a batch are folded before the
//!   statement (the first occurrence inserts, the others hear "confirmed
//!   before"), across batches and gateways the primary key decides;
//! - no added wait when idle: a batch is whatever is queued when a writing
//!   slot is free, so a lone click is written at once, and batches grow only
//!   when the database is the bottleneck;
//! - one bad row never fails its neighbours: a batch refused for its data
//!   (SQLSTATE class 22) is retried one confirmation at a time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use sqlx::PgPool;
use time::OffsetDateTime;
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use verimail_shared::events::{CloudEvent, EMAIL_VERIFIED, Purpose, VerifiedData, VerifyMethod};

use crate::metrics::Metrics;
use crate::store::{self, NewConfirmation};

/// Most confirmations written by one statement.
pub const MAX_BATCH: usize = 256;
/// Batches written at the same time (each holds a pool connection). One: the
/// next batch fills while the current one is written, so batches are as large
/// as the load makes them. More writers at once measured slower with
/// `bench/run.sh` (docs/performance.md): smaller batches, each paying its own
/// round trip and commit.
pub const IN_FLIGHT: usize = 1;
/// Confirmations queued for the writer at most; beyond it clicks wait (within
/// their deadline) instead of growing memory.
pub const QUEUE: usize = 8192;

/// The CloudEvents `source` of the verified event.
pub const EVENT_SOURCE: &str = "/verimail/gateway";

/// A confirmation to record, as a verified link describes it.
#[derive(Debug, Clone)]
pub struct Confirmation {
    /// `r:{request_id}` (v1) or `e:{email}` (legacy).
    pub key: String,
    /// From a `v1` token; legacy links take it from the latest mail.
    pub request_id: Option<String>,
    /// From a `v1` token; legacy links take it from the latest mail.
    pub user_id: Option<String>,
    /// The confirmed address.
    pub email: String,
    /// What the link was for.
    pub purpose: Purpose,
    /// An itsdangerous link (only the address inside).
    pub legacy: bool,
    /// The click's time (`verified_at`).
    pub at: OffsetDateTime,
    /// The link, or the mail's code (`method` of the event). The key is
    /// the same for both, so a link and a code of one mail confirm once.
    pub method: VerifyMethod,
}

/// What recording one confirmation found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// This click confirmed (false: the link was confirmed before).
    pub first: bool,
    /// The user the event names (a legacy link's comes from the latest mail).
    pub user_id: Option<String>,
    /// The `return_url` of the request behind the link, if any.
    pub return_url: Option<String>,
}

/// Why a confirmation could not be recorded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// The database failed or refused (shared by every click of the batch).
    #[error("database: {0}")]
    Database(#[source] Arc<sqlx::Error>),
    /// The writer is gone (the runtime is shutting down).
    #[error("the confirmation writer stopped")]
    Stopped,
    /// The deadline passed before the confirmation's batch began: it was
    /// left out, nothing was written.
    #[error("the confirmation's batch did not begin before the deadline")]
    NotBegun,
}

impl WriteError {
    /// PostgreSQL refused a value (SQLSTATE class 22, data exception): the
    /// input is at fault, not the database.
    pub fn is_data_exception(&self) -> bool {
        match self {
            Self::Database(e) => is_data_exception(e),
            Self::Stopped | Self::NotBegun => false,
        }
    }
}

fn is_data_exception(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().is_some_and(|c| c.starts_with("22")))
}

type Answer = Result<Recorded, WriteError>;

/// A pending confirmation's fate, decided once by whichever side comes first:
/// the writer beginning its batch, or the click giving up at its deadline.
const WAITING: u8 = 0;
const BEGUN: u8 = 1;
const ABANDONED: u8 = 2;

struct Pending {
    confirmation: Confirmation,
    reply: oneshot::Sender<Answer>,
    /// [`WAITING`], then [`BEGUN`] or [`ABANDONED`] (compare-and-swap, so a
    /// click never gives up on a batch that may already have committed it).
    state: Arc<AtomicU8>,
}

impl Pending {
    /// Claims this confirmation for the batch about to run; false when its
    /// click gave up (deadline passed, or the click went away).
    fn begin(&self) -> bool {
        !self.reply.is_closed()
            && self
                .state
                .compare_exchange(WAITING, BEGUN, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }
}

/// The handle clicks submit to; the writer task starts with the first click
/// (inside the server's runtime) and ends when the last handle is dropped.
#[derive(Debug)]
pub struct Writer {
    pool: PgPool,
    /// Wakes the outbox relay after a batch confirmed something.
    wake: Arc<Notify>,
    metrics: Metrics,
    queue: OnceLock<mpsc::Sender<Pending>>,
}

impl Writer {
    /// A writer on `pool` that wakes the relay through `wake` and times its
    /// batches in `metrics`.
    pub fn new(pool: PgPool, wake: Arc<Notify>, metrics: Metrics) -> Self {
        Self {
            pool,
            wake,
            metrics,
            queue: OnceLock::new(),
        }
    }

    /// Records `confirmation` with the next batch; resolves once it is
    /// committed (or failed). Dropping the future before that is safe: a
    /// confirmation whose click stopped waiting is left out of its batch if
    /// the batch has not started yet.
    pub async fn record(&self, confirmation: Confirmation) -> Answer {
        self.record_by(confirmation, None).await
    }

    /// Like [`record`](Self::record), but gives up with
    /// [`WriteError::NotBegun`] if the confirmation's batch has not begun by
    /// `deadline`. Once it has begun, the answer is awaited whatever the
    /// deadline (the statement timeout bounds that wait): the batch may
    /// commit, and a click told "unavailable" for a link it just spent
    /// (`reset_password`) would retry into 410 `used` without its proof.
    pub async fn record_within(&self, confirmation: Confirmation, deadline: Instant) -> Answer {
        self.record_by(confirmation, Some(deadline)).await
    }

    async fn record_by(&self, confirmation: Confirmation, deadline: Option<Instant>) -> Answer {
        let queue = self.queue.get_or_init(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(run(
                self.pool.clone(),
                self.wake.clone(),
                self.metrics.clone(),
                rx,
            ));
            tx
        });
        let (reply, mut answer) = oneshot::channel();
        let state = Arc::new(AtomicU8::new(WAITING));
        let pending = Pending {
            confirmation,
            reply,
            state: state.clone(),
        };
        let Some(deadline) = deadline.map(tokio::time::Instant::from_std) else {
            queue.send(pending).await.map_err(|_| WriteError::Stopped)?;
            return answer.await.unwrap_or(Err(WriteError::Stopped));
        };
        // A full queue: waiting for room counts toward the deadline (nothing began).
        match tokio::time::timeout_at(deadline, queue.send(pending)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(WriteError::Stopped),
            Err(_) => return Err(WriteError::NotBegun),
        }
        tokio::select! {
            a = &mut answer => return a.unwrap_or(Err(WriteError::Stopped)),
            () = tokio::time::sleep_until(deadline) => {}
        }
        if state
            .compare_exchange(WAITING, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            return Err(WriteError::NotBegun);
        }
        // The batch began before the deadline: its result is this click's.
        answer.await.unwrap_or(Err(WriteError::Stopped))
    }
}

/// The writer loop: waits for a free slot, takes everything queued (up to
/// [`MAX_BATCH`]) and writes it in the background.
async fn run(
    pool: PgPool,
    wake: Arc<Notify>,
    metrics: Metrics,
    mut queue: mpsc::Receiver<Pending>,
) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        // The semaphore is never closed.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        if queue.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        let taken = std::mem::replace(&mut batch, Vec::with_capacity(MAX_BATCH));
        let (pool, wake, metrics) = (pool.clone(), wake.clone(), metrics.clone());
        tokio::spawn(async move {
            commit(&pool, &wake, &metrics, taken).await;
            drop(slot);
        });
    }
}

/// Writes one batch and answers its clicks.
async fn commit(pool: &PgPool, wake: &Notify, metrics: &Metrics, batch: Vec<Pending>) {
    // The connection first: a click waiting for one (pool exhausted, database
    // unreachable) has not begun and may still give up at its deadline.
    let mut conn = match pool.acquire().await {
        Ok(conn) => conn,
        Err(e) => {
            let e = Arc::new(e);
            for p in batch {
                let _ = p.reply.send(Err(WriteError::Database(e.clone())));
            }
            return;
        }
    };
    // Clicks that gave up (deadline passed) are not confirmed behind their
    // back; the others are now bound to wait for this batch's answer.
    let batch: Vec<Pending> = batch.into_iter().filter(Pending::begin).collect();
    if batch.is_empty() {
        return;
    }
    let confirmations: Vec<&Confirmation> = batch.iter().map(|p| &p.confirmation).collect();
    let started = std::time::Instant::now();
    let written = write(&mut conn, &confirmations).await;
    metrics.batch(confirmations.len(), started.elapsed());
    match written {
        Ok(recorded) => answer(wake, batch, recorded),
        Err(e) if is_data_exception(&e) && batch.len() > 1 => {
            tracing::warn!(error = %e, rows = batch.len(), "a batch was refused for its data; writing its rows one by one");
            for p in batch {
                let one = write(&mut conn, &[&p.confirmation]).await;
                match one {
                    Ok(recorded) => answer(wake, vec![p], recorded),
                    Err(e) => {
                        let _ = p.reply.send(Err(WriteError::Database(Arc::new(e))));
                    }
                }
            }
        }
        Err(e) => {
            let e = Arc::new(e);
            for p in batch {
                let _ = p.reply.send(Err(WriteError::Database(e.clone())));
            }
        }
    }
}

fn answer(wake: &Notify, batch: Vec<Pending>, recorded: Vec<Recorded>) {
    if recorded.iter().any(|r| r.first) {
        // Wake the relay so the events leave within milliseconds, not at the next poll.
        wake.notify_one();
    }
    for (p, r) in batch.into_iter().zip(recorded) {
        // A click that stopped waiting in the meantime is no one's concern:
        // its confirmation stands, and a second click says so.
        let _ = p.reply.send(Ok(r));
    }
}

/// Records `batch` in one statement (plus one lookup when it holds legacy
/// links) and says, per confirmation and in order, what it found and
/// whether it confirmed.
async fn write(
    conn: &mut sqlx::PgConnection,
    batch: &[&Confirmation],
) -> Result<Vec<Recorded>, sqlx::Error> {
    let legacy: Vec<&str> = batch
        .iter()
        .filter(|c| c.legacy)
        .map(|c| c.email.as_str())
        .collect();
    let latest = store::latest_mails(&mut *conn, &legacy).await?;

    // Per confirmation: its row in `rows` (the first of each key in this
    // batch; later ones only hear what the first did).
    let mut row_of: Vec<usize> = Vec::with_capacity(batch.len());
    let mut rows: Vec<NewConfirmation<'_>> = Vec::with_capacity(batch.len());
    let mut first_of: HashMap<&str, usize> = HashMap::with_capacity(batch.len());
    for c in batch {
        let row = *first_of.entry(&c.key).or_insert_with(|| {
            let (request_id, user_id) = if c.legacy {
                latest.get(&c.email).map_or((None, None), |m| {
                    (Some(m.request_id.as_str()), m.user_id.as_deref())
                })
            } else {
                (c.request_id.as_deref(), c.user_id.as_deref())
            };
            rows.push(new_row(c, request_id, user_id));
            rows.len() - 1
        });
        row_of.push(row);
    }
    let found = store::record_confirmations(&mut *conn, &rows).await?;
    let found: HashMap<&str, &store::RecordedRow> =
        found.iter().map(|f| (f.key.as_str(), f)).collect();
    let mut answered = vec![false; rows.len()];
    let recorded = row_of
        .into_iter()
        .zip(batch)
        .map(|(i, c)| {
            let row = &rows[i];
            let f = found.get(row.key);
            // Only the first click of a key in the batch can be the one that confirmed.
            let first = f.is_some_and(|f| f.inserted) && !std::mem::replace(&mut answered[i], true);
            if first {
                tracing::info!(event_id = %row.event_id, request_id = ?row.request_id, method = c.method.as_str(), "confirmed");
            }
            Recorded {
                first,
                user_id: row.user_id.map(str::to_owned),
                return_url: f.and_then(|f| f.return_url.clone()),
            }
        })
        .collect();
    Ok(recorded)
}

/// `"context":null` as serde_json writes it: the one place the event is cut
/// so that PostgreSQL can put the request's context there.
const CONTEXT_GAP: &[u8] = b"\"context\":null";

/// The row and verified event of `c`, naming `request_id` and `user_id`.
fn new_row<'a>(
    c: &'a Confirmation,
    request_id: Option<&'a str>,
    user_id: Option<&'a str>,
) -> NewConfirmation<'a> {
    let event_id = uuid::Uuid::now_v7().to_string();
    let mut event = CloudEvent::with_id(
        event_id.clone(),
        EMAIL_VERIFIED,
        EVENT_SOURCE,
        VerifiedData {
            request_id: request_id.map(str::to_owned),
            user_id: user_id.map(str::to_owned),
            email: c.email.clone(),
            purpose: c.purpose.as_str().to_owned(),
            // Filled in by the statement from the request's row.
            context: None,
            verified_at: c.at,
            method: c.method,
        },
    );
    event.time = Some(c.at);
    let (head, tail) = split_at_context(event.to_bytes());
    NewConfirmation {
        key: &c.key,
        request_id,
        user_id,
        email: &c.email,
        purpose: c.purpose.as_str(),
        event_id,
        verified_at: c.at,
        head,
        tail,
    }
}

/// Cuts a serialized event at its `context` value: `head` ends with
/// `"context":`, `tail` starts right after `null`. Only the key can match:
/// inside a JSON string every `"` is escaped, so `context"` followed by `:`
/// never occurs in a value. No tail: the body is whole, nothing to insert.
fn split_at_context(mut body: Vec<u8>) -> (Vec<u8>, Option<Vec<u8>>) {
    let at = body
        .windows(CONTEXT_GAP.len())
        .position(|w| w == CONTEXT_GAP);
    match at {
        Some(at) => {
            let tail = body.split_off(at + CONTEXT_GAP.len());
            body.truncate(body.len() - b"null".len());
            (body, Some(tail))
        }
        // The event type always has the field (a test says so); were it ever
        // missing, the event would go out as serialized rather than not at all.
        None => (body, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(email: &str) -> Vec<u8> {
        let c = Confirmation {
            key: "r:1".into(),
            request_id: Some("1".into()),
            user_id: Some("u".into()),
            email: email.into(),
            purpose: Purpose::VerifyEmail,
            legacy: false,
            at: OffsetDateTime::UNIX_EPOCH,
            method: VerifyMethod::Code,
        };
        let row = new_row(&c, c.request_id.as_deref(), c.user_id.as_deref());
        let context = br#"{"a": [1, "\"context\":null"]}"#;
        [
            &row.head[..],
            context,
            row.tail.as_deref().unwrap_or_default(),
        ]
        .concat()
    }

    #[test]
    fn the_verified_event_is_cut_exactly_at_its_context() {
        // An address that spells the cut inside a string must not move it.
        for email in ["a@example.com", r#""context":null@example.com"#] {
            let body = event(email);
            let parsed: serde_json::Value =
                serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
            assert_eq!(
                parsed["data"]["email"],
                email,
                "{}",
                String::from_utf8_lossy(&body)
            );
            assert_eq!(
                parsed["data"]["context"],
                serde_json::json!({"a": [1, "\"context\":null"]})
            );
            assert_eq!(parsed["data"]["request_id"], "1");
            assert_eq!(parsed["data"]["method"], "code");
            assert_eq!(parsed["type"], EMAIL_VERIFIED);
        }
    }
}
