//! `MAIL_RATE_LIMIT`: one budget of send slots for every worker of the
//! namespace, kept in PostgreSQL by GCRA ("virtual scheduling").
//!
//! The row `mail_rate_limit(namespace, tat)` holds the first free slot. A
//! worker reserves a block of consecutive slots, one interval `T = 1/rate`
//! apart, in one statement timed on the database's clock, then sends mail
//! `i` of the block at its slot. Every send of the namespace owns a distinct
//! slot on one timeline, and idle time never builds credit (a block starts
//! no earlier than now), so no 2 s window holds more than `2·rate + 1`
//! sends; a fourth worker shares the same row and adds nothing. Slots are
//! booked at most [`HORIZON`] ahead, and a slot this worker could not use in
//! time (handed out or woken up for more than [`STALE`] after it) is
//! dropped, never spent late in a burst. Mails waiting for a slot
//! stay unacknowledged in the worker and the rest stay in the queue;
//! `verimail_worker_mail_rate_limit_wait_seconds` says how long they waited.

use std::collections::VecDeque;
use std::sync::PoisonError;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::Mutex;
use tracing::warn;
use verimail_shared::config::MailRateLimit;

/// Histogram of the time a mail waited for its slot, seconds.
pub const WAIT_SECONDS: &str = "verimail_worker_mail_rate_limit_wait_seconds";
/// How far ahead slots may be booked.
pub const HORIZON: Duration = Duration::from_secs(1);
/// A slot older than this when its mail comes, or when its mail wakes up
/// for it, is dropped, not spent late: every send happens within this of its
/// slot, so a 2 s window holds the sends of at most 2 s plus this of slots.
const STALE: Duration = Duration::from_millis(40);

/// This worker's share of the namespace's send budget.
#[derive(Debug)]
pub struct Pace {
    pool: PgPool,
    namespace: String,
    interval: Duration,
    /// Slots reserved per statement: about 0.2 s of the rate.
    block: u32,
    /// Reserved slots not handed out yet, in order. Behind an async mutex,
    /// fair, so mails get slots in the order they asked.
    slots: Mutex<VecDeque<Instant>>,
    /// The database's clock against ours.
    clock: std::sync::Mutex<Clock>,
}

impl Pace {
    /// The budget `limit` for `namespace`; creates its row when missing.
    pub async fn new(
        pool: PgPool,
        namespace: String,
        limit: MailRateLimit,
    ) -> Result<Self, sqlx::Error> {
        sqlx::query(
            "INSERT INTO mail_rate_limit (namespace, tat) VALUES ($1, clock_timestamp())
             ON CONFLICT (namespace) DO NOTHING",
        )
        .bind(&namespace)
        .execute(&pool)
        .await?;
        let per_second = limit.per_second();
        // At most 10 slots (0.2 s at 50/s): small blocks keep workers' shares even.
        let block = [10, 5, 2]
            .into_iter()
            .find(|&b| f64::from(b) <= per_second * 0.2)
            .unwrap_or(1);
        Ok(Self {
            pool,
            namespace,
            interval: limit.interval(),
            block,
            slots: Mutex::new(VecDeque::new()),
            clock: std::sync::Mutex::new(Clock {
                at: Instant::now(),
                db: 0.0,
                round_trip: Duration::MAX,
            }),
        })
    }

    /// Waits for this mail's slot.
    pub async fn wait(&self) {
        let asked = Instant::now();
        loop {
            let slot = self.next_slot().await;
            tokio::time::sleep_until(slot.into()).await;
            // Woken too late (a busy machine): the slot is gone, as at
            // handout; several late sleepers sending at once would be a burst.
            if slot.elapsed() <= STALE {
                break;
            }
        }
        metrics::histogram!(WAIT_SECONDS).record(asked.elapsed().as_secs_f64());
    }

    async fn next_slot(&self) -> Instant {
        let mut slots = self.slots.lock().await;
        loop {
            let now = Instant::now();
            while slots.front().is_some_and(|s| *s + STALE < now) {
                slots.pop_front();
            }
            if let Some(slot) = slots.pop_front() {
                return slot;
            }
            match self.reserve().await {
                Ok(Some(first)) => {
                    slots.extend((0..self.block).map(|i| first + self.interval * i));
                }
                Ok(None) => {
                    // Booked up to the horizon: a block frees up within its own length.
                    tokio::time::sleep(self.interval * self.block / 2).await;
                }
                Err(e) => {
                    // No budget without the database: wait, never send unlimited.
                    warn!(error = %e, "reserving send slots failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// One statement: books a block of slots if the first free one is within
    /// the horizon (creating the namespace's row when missing); the local
    /// instant of the block's first slot.
    ///
    /// The slot comes back as a time on the database's clock, and is placed
    /// on ours through the answer with the shortest round trip seen
    /// ([`Clock`]): every worker then sends at the slot's own time, so one
    /// worker's slow answer cannot push its block onto another's.
    async fn reserve(&self) -> Result<Option<Instant>, sqlx::Error> {
        // The SET and WHERE are evaluated on the locked row, so
        // `clock_timestamp()` is read after any wait for the lock.
        const RESERVE: &str = r"
INSERT INTO mail_rate_limit AS m (namespace, tat)
VALUES ($1, clock_timestamp() + $2::float8 * interval '1 second')
ON CONFLICT (namespace) DO UPDATE
SET tat = GREATEST(m.tat, clock_timestamp()) + $2::float8 * interval '1 second'
WHERE GREATEST(m.tat, clock_timestamp()) <= clock_timestamp() + $3::float8 * interval '1 second'
RETURNING EXTRACT(EPOCH FROM m.tat)::float8 - $2::float8,
          EXTRACT(EPOCH FROM clock_timestamp())::float8";
        let block_length = self.interval * self.block;
        let sent = Instant::now();
        let row: Option<(f64, f64)> = sqlx::query_as(RESERVE)
            .bind(&self.namespace)
            .bind(block_length.as_secs_f64())
            .bind(HORIZON.as_secs_f64())
            .fetch_optional(&self.pool)
            .await?;
        let received = Instant::now();
        let Some((start, db_now)) = row else {
            return Ok(None);
        };
        let clock = {
            let mut clock = self.clock.lock().unwrap_or_else(PoisonError::into_inner);
            clock.sample(sent, received, db_now);
            *clock
        };
        Ok(Some(clock.local(start)))
    }
}

/// Where the database's clock stands against ours: the answer with the
/// shortest round trip of the last minute (NTP's rule), its database time
/// taken as read halfway through the round trip.
#[derive(Debug, Clone, Copy)]
struct Clock {
    /// Our instant matching `db`.
    at: Instant,
    /// Seconds since the epoch on the database's clock.
    db: f64,
    round_trip: Duration,
}

impl Clock {
    const FRESH_FOR: Duration = Duration::from_secs(60);

    fn sample(&mut self, sent: Instant, received: Instant, db: f64) {
        let round_trip = received.duration_since(sent);
        if round_trip <= self.round_trip || self.at.elapsed() > Self::FRESH_FOR {
            *self = Self {
                at: sent + round_trip / 2,
                db,
                round_trip,
            };
        }
    }

    /// Our instant of database time `db`.
    fn local(&self, db: f64) -> Instant {
        let offset = db - self.db;
        if offset >= 0.0 {
            self.at + Duration::try_from_secs_f64(offset).unwrap_or_default()
        } else {
            self.at
                .checked_sub(Duration::try_from_secs_f64(-offset).unwrap_or_default())
                .unwrap_or(self.at)
        }
    }
}
