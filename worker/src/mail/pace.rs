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
//! time is dropped, never spent late in a burst. Mails waiting for a slot
//! stay unacknowledged in the worker and the rest stay in the queue;
//! `verimail_worker_mail_rate_limit_wait_seconds` says how long they waited.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::Mutex;
use tracing::warn;
use verimail_shared::config::MailRateLimit;

/// Histogram of the time a mail waited for its slot, seconds.
pub const WAIT_SECONDS: &str = "verimail_worker_mail_rate_limit_wait_seconds";
/// How far ahead slots may be booked.
pub const HORIZON: Duration = Duration::from_secs(1);
/// A slot older than this when its mail comes is dropped, not spent late.
const STALE: Duration = Duration::from_millis(20);

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
        })
    }

    /// Waits for this mail's slot.
    pub async fn wait(&self) {
        let asked = Instant::now();
        let slot = self.next_slot().await;
        tokio::time::sleep_until(slot.into()).await;
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
                Ok(Reserved::Block { first_in }) => {
                    let first = Instant::now() + first_in;
                    slots.extend((0..self.block).map(|i| first + self.interval * i));
                }
                Ok(Reserved::Full { first_free_in }) => {
                    // Booked up to the horizon: come back when a block fits.
                    let wait = first_free_in.saturating_sub(HORIZON) + self.interval;
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    // No budget without the database: wait, never send unlimited.
                    warn!(error = %e, "reserving send slots failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// One statement: reserves a block of slots if the first free one is
    /// within the horizon.
    async fn reserve(&self) -> Result<Reserved, sqlx::Error> {
        const RESERVE: &str = r"
WITH c AS (SELECT clock_timestamp() AS now),
old AS (
    SELECT GREATEST(m.tat, c.now) AS start, c.now
    FROM mail_rate_limit m, c
    WHERE m.namespace = $1
    FOR UPDATE OF m
),
booked AS (
    UPDATE mail_rate_limit m
    SET tat = old.start + $2::float8 * interval '1 second'
    FROM old
    WHERE m.namespace = $1 AND old.start <= old.now + $3::float8 * interval '1 second'
    RETURNING 1
)
SELECT EXTRACT(EPOCH FROM (old.start - old.now))::float8, EXISTS (SELECT 1 FROM booked)
FROM old";
        let block_length = self.interval * self.block;
        let row: Option<(f64, bool)> = sqlx::query_as(RESERVE)
            .bind(&self.namespace)
            .bind(block_length.as_secs_f64())
            .bind(HORIZON.as_secs_f64())
            .fetch_optional(&self.pool)
            .await?;
        let Some((first_in, booked)) = row else {
            // The row went missing (a manual cleanup): make it again.
            sqlx::query(
                "INSERT INTO mail_rate_limit (namespace, tat) VALUES ($1, clock_timestamp())
                 ON CONFLICT (namespace) DO NOTHING",
            )
            .bind(&self.namespace)
            .execute(&self.pool)
            .await?;
            return Ok(Reserved::Full {
                first_free_in: Duration::ZERO,
            });
        };
        let first_in = Duration::try_from_secs_f64(first_in.max(0.0)).unwrap_or_default();
        Ok(if booked {
            Reserved::Block { first_in }
        } else {
            Reserved::Full {
                first_free_in: first_in,
            }
        })
    }
}

enum Reserved {
    /// A block was booked; its first slot is this far from now.
    Block { first_in: Duration },
    /// Booked up to the horizon; the first free slot is this far from now.
    Full { first_free_in: Duration },
}
