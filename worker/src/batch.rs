//! Group commit for the per-delivery SQL: deliveries running concurrently hand
//! their statement's input to one task, which runs whatever has queued up
//! together (the worker's rounds: one statement per kind, one transaction,
//! one commit and WAL flush; `store::BatchedStore`) and answers each.
//!
//! There is no collection window: a batch is whatever queued while the
//! running ones ran ([`IN_FLIGHT`] at most), so a lone delivery waits for
//! nothing and a busy worker gets large batches. Jobs carry conflict keys
//! (request id, throttle key); two jobs with a common key never share a batch
//! (a statement may not touch one row twice, and the throttle must see them
//! in turn): the later one goes to a later batch, keeping arrival order per key.

use std::collections::VecDeque;
use std::future::Future;
use std::hash::{BuildHasher, Hash, Hasher};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{mpsc, oneshot};

use crate::metrics;

/// Most jobs in one batch (a worker's round: a mail's claim, conclusion and
/// mark are three jobs).
pub const MAX_BATCH: usize = 256;
/// Batches running at once, each on its own connection. One:
/// what arrives while a batch runs waits for the next, so batches grow with
/// the load and a slow commit (a slow disk) is paid once for all of them
/// (256 jobs per short flush is far above any mail rate). Two at a time were
/// measured slower (docs/performance.md): smaller batches, each paying its
/// own round trip, planning and commit. (With more, jobs
/// with a common key could be in two running batches; PostgreSQL's row
/// locks would order them, as they order two workers' statements.)
pub const IN_FLIGHT: usize = 1;

/// A conflict key: jobs with an equal key never share a batch. `0` is "none".
/// A hash: a collision only costs a job one batch of waiting, so a fast
/// unkeyed one serves (std's SipHash, here and in the per-mail sets, was
/// about 4 k instructions a mail: docs/performance.md).
pub fn key(domain: &str, parts: &[&str]) -> u64 {
    let mut h = foldhash::fast::FixedState::default().build_hasher();
    domain.hash(&mut h);
    parts.hash(&mut h);
    h.finish().max(1)
}

/// What a job says about its conflicts.
pub trait Keyed {
    /// Its conflict keys (`0` for an unused slot).
    fn keys(&self) -> [u64; 2];
}

struct Job<I, O> {
    input: I,
    reply: oneshot::Sender<O>,
}

/// The handle deliveries call; the task stops when every handle is dropped.
#[derive(Debug)]
pub struct Batcher<I, O> {
    tx: mpsc::Sender<Job<I, O>>,
    deadline: Duration,
}

impl<I, O> Clone for Batcher<I, O> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            deadline: self.deadline,
        }
    }
}

impl<I, O> std::fmt::Debug for Job<I, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Job")
    }
}

impl<I, O> Batcher<I, O>
where
    I: Keyed + Send + 'static,
    O: Send + 'static,
{
    /// Starts the task. `run` gets up to [`MAX_BATCH`] inputs with pairwise
    /// distinct keys and answers them in order, or `None` when the statement
    /// failed (each caller then runs its own statement, with its own retries
    /// and error reporting).
    ///
    /// `statement` names the batches in the metrics; a caller waits at most
    /// `deadline` for its answer (queueing included), then does the work alone.
    pub fn spawn<F, Fut>(statement: &'static str, deadline: Duration, run: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Option<Vec<O>>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(MAX_BATCH * 4);
        tokio::spawn(drive(statement, rx, run));
        Self { tx, deadline }
    }

    /// Queues `input` and waits for its answer; `None` when the batch failed,
    /// the deadline passed (a batch stuck on a lock or on a socket that stopped
    /// answering) or the task is gone: the caller then does the work alone. A
    /// job whose caller left before its batch began is dropped unrun.
    pub async fn call(&self, input: I) -> Option<O> {
        let (reply, answer) = oneshot::channel();
        let call = async {
            self.tx.send(Job { input, reply }).await.ok()?;
            answer.await.ok()
        };
        tokio::time::timeout(self.deadline, call)
            .await
            .ok()
            .flatten()
    }
}

async fn drive<I, O, F, Fut>(statement: &'static str, mut rx: mpsc::Receiver<Job<I, O>>, run: F)
where
    I: Keyed,
    F: Fn(Vec<I>) -> Fut,
    Fut: Future<Output = Option<Vec<O>>>,
{
    let mut pending: VecDeque<Job<I, O>> = VecDeque::with_capacity(MAX_BATCH * 2);
    let mut fresh = Vec::with_capacity(MAX_BATCH);
    let mut running = FuturesUnordered::new();
    let mut open = true;
    loop {
        // Callers that gave up (their deadline passed) do the work alone.
        pending.retain(|job| !job.reply.is_closed());
        while !pending.is_empty() && running.len() < IN_FLIGHT {
            let batch = take_batch(&mut pending, MAX_BATCH);
            running.push(execute(statement, batch, &run));
        }
        if !open && pending.is_empty() && running.is_empty() {
            return;
        }
        tokio::select! {
            Some(()) = running.next(), if !running.is_empty() => {}
            // New work is taken only when a batch could start with it, so
            // while every slot is busy it queues up into the next batch.
            n = rx.recv_many(&mut fresh, MAX_BATCH), if open && running.len() < IN_FLIGHT => {
                open = n > 0;
                pending.extend(fresh.drain(..));
            }
        }
    }
}

/// Runs one batch and answers its callers.
async fn execute<I, O, F, Fut>(statement: &'static str, batch: Vec<Job<I, O>>, run: &F)
where
    F: Fn(Vec<I>) -> Fut,
    Fut: Future<Output = Option<Vec<O>>>,
{
    let (inputs, replies): (Vec<I>, Vec<oneshot::Sender<O>>) =
        batch.into_iter().map(|j| (j.input, j.reply)).unzip();
    let (size, started) = (inputs.len(), Instant::now());
    let outputs = run(inputs).await;
    metrics::batch(statement, size, started.elapsed());
    // On failure the replies are dropped: every caller falls back.
    if let Some(outputs) = outputs {
        for (reply, output) in replies.into_iter().zip(outputs) {
            let _ = reply.send(output);
        }
    }
}

/// Takes, in arrival order, up to `max` jobs whose keys are pairwise distinct;
/// the others stay queued, in order. The first job always goes, so every
/// batch makes progress.
fn take_batch<J: Keyed>(pending: &mut VecDeque<J>, max: usize) -> Vec<J> {
    let mut seen = foldhash::HashSet::with_capacity_and_hasher(max * 2, Default::default());
    let mut batch = Vec::with_capacity(max.min(pending.len()));
    let mut rest = VecDeque::new();
    while let Some(job) = pending.pop_front() {
        let keys = job.keys();
        let free = keys.iter().all(|k| *k == 0 || !seen.contains(k));
        if batch.len() < max && free {
            seen.extend(keys.into_iter().filter(|k| *k != 0));
            batch.push(job);
        } else {
            rest.push_back(job);
        }
    }
    *pending = rest;
    batch
}

impl<I: Keyed, O> Keyed for Job<I, O> {
    fn keys(&self) -> [u64; 2] {
        self.input.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct J(&'static str, u64, u64);

    impl Keyed for J {
        fn keys(&self) -> [u64; 2] {
            [self.1, self.2]
        }
    }

    #[test]
    fn jobs_sharing_a_key_go_to_later_batches_in_arrival_order() {
        let mut q: VecDeque<J> = [
            J("a", 1, 10),
            J("b", 2, 10),
            J("c", 3, 0),
            J("d", 4, 10),
            J("e", 1, 0),
        ]
        .into();
        let first: Vec<&str> = take_batch(&mut q, 10).iter().map(|j| j.0).collect();
        assert_eq!(first, ["a", "c"]);
        let second: Vec<&str> = take_batch(&mut q, 10).iter().map(|j| j.0).collect();
        assert_eq!(second, ["b", "e"]);
        let third: Vec<&str> = take_batch(&mut q, 10).iter().map(|j| j.0).collect();
        assert_eq!(third, ["d"]);
        assert!(q.is_empty());
    }

    #[test]
    fn a_batch_holds_at_most_max_jobs() {
        let mut q: VecDeque<J> = (0..5).map(|i| J("x", i + 1, 0)).collect();
        assert_eq!(take_batch(&mut q, 3).len(), 3);
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn keys_are_never_zero_and_depend_on_domain_and_parts() {
        assert_ne!(key("id", &["a"]), 0);
        assert_ne!(key("id", &["a"]), key("throttle", &["a"]));
        assert_ne!(key("t", &["ab", "c"]), key("t", &["a", "bc"]));
        assert_eq!(key("id", &["a"]), key("id", &["a"]));
    }

    #[tokio::test]
    async fn a_batch_that_never_ends_fails_its_callers_over_at_the_deadline() {
        let stuck: Batcher<J, ()> = Batcher::spawn("test", Duration::from_millis(200), |_| {
            std::future::pending::<Option<Vec<()>>>()
        });
        let started = Instant::now();
        assert_eq!(stuck.call(J("z", 1, 0)).await, None);
        assert_eq!(stuck.call(J("y", 2, 0)).await, None);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn calls_queued_together_are_answered_by_one_batch() {
        use std::sync::{Arc, Mutex};
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let b: Batcher<J, &'static str> =
            Batcher::spawn("test", Duration::from_secs(5), move |inputs: Vec<J>| {
                seen.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(inputs.len());
                async move { Some(inputs.into_iter().map(|j| j.0).collect()) }
            });
        let names = ["a", "b", "c", "d", "e", "f", "g", "h"];
        // On this single-threaded runtime every call is queued before the
        // batching task first runs, so one batch must answer them all (a
        // batcher running one statement per call would show eight).
        let calls = names
            .iter()
            .enumerate()
            .map(|(i, n)| b.call(J(n, i as u64 + 1, 0)));
        let answers = futures_util::future::join_all(calls).await;
        let got: Vec<&str> = answers.into_iter().flatten().collect();
        assert_eq!(got, names);
        assert_eq!(*sizes.lock().unwrap_or_else(|e| e.into_inner()), [8]);

        let failing: Batcher<J, ()> =
            Batcher::spawn("test", Duration::from_secs(5), |_| async { None });
        assert_eq!(failing.call(J("z", 1, 0)).await, None);
    }
}
