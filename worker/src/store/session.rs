//! [`BatchedStore`]: concurrent deliveries' statements batched into rounds,
//! on the batching task's own connection, with the worker's deadlines.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection};
use tracing::debug;

use super::{
    Claim, ClaimInput, Claimed, Finish, FinishInput, LookBack, Mark, RequestRow, Store, Write,
};
use crate::batch::{Batcher, Keyed};
use crate::health::Health;
use crate::metrics;

/// Claims and conclusions of concurrent deliveries, batched into rounds (see
/// [`crate::batch`]): one transaction per round, on a connection of its own,
/// holding the conclusions and marks that queued up (one statement) and the
/// claims (another), so a round pays one commit and one WAL flush where the
/// two kinds, batched apart, paid two. A round that fails (a deadlock with
/// another worker, an outage) falls back to the single-request statement for
/// each of its callers, with their own retries.
#[derive(Debug, Clone)]
pub struct BatchedStore {
    store: Store,
    rounds: Batcher<Job, Answer>,
}

impl BatchedStore {
    /// Starts the batching task on `store`, with a connection of its own; it
    /// ends (and closes it) when every clone is dropped. A round that runs out
    /// of time is reported to `health` until one completes again.
    pub fn spawn(store: Store, health: Arc<Health>) -> Self {
        let rounds = {
            let (s, sessions) = (store.clone(), Sessions::new(&store, &health));
            Batcher::spawn("round", CALL_DEADLINE, move |jobs: Vec<Job>| {
                let (s, sessions) = (s.clone(), sessions.clone());
                async move {
                    let n = jobs.len();
                    sessions
                        .run("round", n, async |conn| round(&s, conn, jobs).await)
                        .await
                }
            })
        };
        Self { store, rounds }
    }

    /// [`Store::claim_with`], batched with other deliveries' claims.
    pub async fn claim(
        &self,
        row: RequestRow<'_>,
        throttle: Option<Duration>,
        takeover: bool,
    ) -> Result<Claim, sqlx::Error> {
        let input = ClaimInput::new(row, throttle).takeover(takeover);
        // The statements alone are boxed: they are rare, and their futures
        // would otherwise make this one, on every delivery's path, kilobytes.
        match self.rounds.call(Job::Claim(input)).await {
            Some(Answer::Claimed(Some(claimed))) => Ok(Claim::Claimed(claimed)),
            Some(Answer::Claimed(None)) => Box::pin(self.store.lookup_and_lease(row.id)).await,
            _ => Box::pin(self.store.claim_with(row, throttle, takeover)).await,
        }
    }

    /// [`Store::finish`], batched with other deliveries' conclusions; like
    /// it, `true` for this very outcome already stored.
    pub async fn finish(&self, f: Finish<'_>) -> Result<bool, sqlx::Error> {
        let job = Job::Write(Write::Finish(FinishInput::new(&f)));
        match self.rounds.call(job).await {
            Some(Answer::Written(true)) => Ok(true),
            // A batch does not look for this outcome already stored
            // ([`LookBack`]): the single statement does, on a snapshot taken
            // after the batch.
            Some(_) => Box::pin(self.store.finish(f)).await,
            // A round given up on (its deadline passed) may still commit this
            // outcome: the single statement waits for its rows' locks but
            // reads with a snapshot from before that commit, so a second one,
            // on a fresh snapshot, looks again.
            None => {
                if Box::pin(self.store.finish(f)).await? {
                    return Ok(true);
                }
                Box::pin(self.store.finish(f)).await
            }
        }
    }

    /// [`Store::mark_published`], batched with other deliveries' conclusions.
    pub async fn mark_published(&self, mark: &Mark) -> Result<(), sqlx::Error> {
        match self
            .rounds
            .call(Job::Write(Write::MarkPublished(mark.clone())))
            .await
        {
            Some(Answer::Written(_)) => Ok(()),
            _ => Box::pin(self.store.mark_published(mark)).await,
        }
    }
}

/// What a delivery hands to a round.
#[derive(Debug)]
pub(super) enum Job {
    /// A claim, for the claims' statement.
    Claim(ClaimInput),
    /// A conclusion or a mark, for the conclusions' statement.
    Write(Write),
}

/// A round's answer to one [`Job`], of the job's kind.
#[derive(Debug)]
pub(super) enum Answer {
    /// The claims' statement's answer.
    Claimed(Option<Claimed>),
    /// The conclusions' statement's answer.
    Written(bool),
}

impl Keyed for Job {
    // Each kind's own keys: a claim and a conclusion or mark of one request
    // share the request's, so they never share a round (a delivery's
    // conclusion follows its claim's answer anyway); a claim and a conclusion
    // of one throttle key may, and the claim sees what the conclusion did.
    fn keys(&self) -> [u64; 2] {
        match self {
            Job::Claim(c) => c.keys(),
            Job::Write(w) => w.keys(),
        }
    }
}

/// One round on `conn`: the conclusions and marks first (a throttle a failed
/// send gives back is free for this round's claims), then the claims, in one
/// transaction; answers in `jobs`' order. A round of one kind runs its
/// statement alone, in its own implicit transaction.
///
/// Each statement keeps the lock order (module docs) within itself; across
/// the two, the conclusions' locks (their `requests` rows, and the `throttle`
/// rows they give back or refresh: a send that took over a second) are held
/// while the claims take theirs. A cycle with another worker's round, or
/// with a statement on the pool, then needs a claim of a duplicate of a
/// request the other side is concluding, or of a throttle key the other
/// side's conclusion holds, while the other side waits on this round: rare
/// (a duplicate meeting its original in flight). PostgreSQL breaks it after
/// `deadlock_timeout` by failing one transaction; that round's callers run
/// their statements alone (the test
/// `crossing_rounds_of_two_workers_deadlock_once_and_every_caller_is_answered`
/// makes such a cycle). A statement stuck on a lock now holds back the
/// whole round (up to [`LOCK_TIMEOUT`] each), and a failed round sends
/// all its jobs, both kinds, to the pool.
async fn round(
    store: &Store,
    conn: &mut PgConnection,
    jobs: Vec<Job>,
) -> Result<Vec<Answer>, sqlx::Error> {
    let mut kinds = Vec::with_capacity(jobs.len());
    let (mut claims, mut writes) = (Vec::new(), Vec::new());
    for job in jobs {
        kinds.push(matches!(job, Job::Claim(_)));
        match job {
            Job::Claim(c) => claims.push(c),
            Job::Write(w) => writes.push(w),
        }
    }
    let (written, claimed) = if claims.is_empty() || writes.is_empty() {
        statements(store, conn, &writes, &claims).await?
    } else {
        let mut tx = conn.begin().await?;
        let answers = statements(store, &mut tx, &writes, &claims).await?;
        tx.commit().await?;
        answers
    };
    let (mut claimed, mut written) = (claimed.into_iter(), written.into_iter());
    Ok(kinds
        .into_iter()
        .map(|claim| {
            if claim {
                Answer::Claimed(claimed.next().flatten())
            } else {
                Answer::Written(written.next().unwrap_or(false))
            }
        })
        .collect())
}

/// A round's statements on `conn`, each run only when it has inputs: the
/// conclusions' and marks' answers, then the claims'.
async fn statements(
    store: &Store,
    conn: &mut PgConnection,
    writes: &[Write],
    claims: &[ClaimInput],
) -> Result<(Vec<bool>, Vec<Option<Claimed>>), sqlx::Error> {
    let mut written = Vec::new();
    if !writes.is_empty() {
        let started = Instant::now();
        written = store.finish_batch_on(conn, writes, LookBack::No).await?;
        metrics::batch("finish", writes.len(), started.elapsed());
    }
    let mut claimed = Vec::new();
    if !claims.is_empty() {
        let started = Instant::now();
        claimed = store.claim_batch_on(conn, claims).await?;
        metrics::batch("claim", claims.len(), started.elapsed());
    }
    Ok((written, claimed))
}

/// Planner settings of the batching task's connections (see the module docs):
/// every batch statement reaches its rows by primary key, through nested
/// loops over the input arrays, at any table size; and its one generic plan
/// is kept. Left to choose, PostgreSQL compared the generic plan's estimate
/// with its custom plans' (which fold the parameters in and drop the parts
/// they switch off) and planned every execution anew: about a millisecond of
/// planning per statement, the most of what a request cost the database at
/// low load (docs/performance.md).
pub const BATCH_SESSION: [(&str, &str); 4] = [
    ("enable_seqscan", "off"),
    ("enable_hashjoin", "off"),
    ("enable_mergejoin", "off"),
    ("plan_cache_mode", "force_generic_plan"),
];

/// Longest a batching task waits for its connection to open.
const SESSION_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// `statement_timeout` of every worker statement (pool and batch sessions):
/// no statement of the worker rightly takes more than milliseconds.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
/// `lock_timeout` of every worker statement: a statement queued behind a lock
/// held this long (another session stuck, an operator's `LOCK TABLE`) gives
/// up, and its delivery retries.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a round may run on its connection, on our side: past it the
/// connection is dropped (a socket that stopped answering never times out
/// on the server). A round's two statements, each stuck on a lock, give up
/// on the server after [`LOCK_TIMEOUT`] each, within this; two merely slow
/// ones (near [`STATEMENT_TIMEOUT`]) are cut here, and the round's callers
/// run alone.
const BATCH_DEADLINE: Duration = Duration::from_secs(6);
/// Longest a delivery waits for its batch's answer, queueing behind the
/// running batch included, before running its statement alone.
const CALL_DEADLINE: Duration = Duration::from_secs(8);

/// The server-side deadlines of the worker's connections.
pub fn deadlines() -> verimail_shared::db::Deadlines {
    verimail_shared::db::Deadlines {
        statement: Some(STATEMENT_TIMEOUT),
        lock: Some(LOCK_TIMEOUT),
    }
}

/// A batching task's own connections (one per running batch), opened on
/// first use and again after a failure (the batch's callers meanwhile fall
/// back to the pool).
#[derive(Clone)]
struct Sessions {
    options: Arc<PgConnectOptions>,
    idle: Arc<std::sync::Mutex<Vec<PgConnection>>>,
    health: Arc<Health>,
}

impl Sessions {
    /// Connections for one batching task, on the pool's server and database
    /// (with its statement and lock timeouts).
    fn new(store: &Store, health: &Arc<Health>) -> Self {
        let options = (*store.pool.connect_options())
            .clone()
            .options(BATCH_SESSION);
        Self {
            options: Arc::new(options),
            idle: Arc::default(),
            health: health.clone(),
        }
    }

    /// Runs `op` on an idle connection (or a new one). A connection whose
    /// batch failed may be broken or mid-transaction: it is dropped, and the
    /// next batch opens a fresh one.
    async fn run<T>(
        &self,
        statement: &'static str,
        n: usize,
        op: impl AsyncFnOnce(&mut PgConnection) -> Result<T, sqlx::Error>,
    ) -> Option<T> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        let result = match idle {
            Some(conn) => Ok(conn),
            None => tokio::time::timeout(SESSION_CONNECT_TIMEOUT, self.options.connect())
                .await
                .unwrap_or(Err(sqlx::Error::PoolTimedOut)),
        };
        let mut conn = match result {
            Ok(conn) => conn,
            Err(e) => {
                debug!(error = %e, statement, n, "cannot open a batch connection; its requests run alone");
                return None;
            }
        };
        // On our deadline the connection is dropped with the future: its
        // socket may have stopped answering.
        let result = tokio::time::timeout(BATCH_DEADLINE, op(&mut conn)).await;
        match result {
            Ok(Ok(v)) => {
                self.health.set_batches_stalled(false);
                self.idle
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(conn);
                Some(v)
            }
            Ok(Err(e)) => {
                // A statement or lock timeout: the batch was stuck, not refused.
                let timed_out = matches!(&e, sqlx::Error::Database(d)
                    if matches!(d.code().as_deref(), Some("57014") | Some("55P03")));
                if timed_out {
                    self.health.set_batches_stalled(true);
                }
                debug!(error = %e, statement, n, "batch failed; its requests run alone");
                None
            }
            Err(_) => {
                self.health.set_batches_stalled(true);
                debug!(
                    statement,
                    n, "batch ran out of time; its requests run alone"
                );
                None
            }
        }
    }
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions").finish_non_exhaustive()
    }
}
