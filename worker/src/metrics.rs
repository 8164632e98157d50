//! Prometheus metrics, rendered on `/metrics`.
//!
//! The `metrics` facade has one global recorder per process, so it is
//! installed once and shared by every [`crate::Worker`] in the process (tests
//! start several); each worker's `/metrics` renders the same registry.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Counter, Histogram, counter, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Outcomes published, by `outcome` (`sent`, `throttled`, `failed`) and `reason`.
pub const OUTCOMES: &str = "verimail_worker_outcomes_total";
/// Requests sent to a retry queue after a transient failure.
pub const RETRIES: &str = "verimail_worker_retries_total";
/// Messages moved to `{ns}.dead`, by `reason`.
pub const DEAD_LETTERS: &str = "verimail_worker_dead_letters_total";
/// Deliveries of a request id already handled or in hand elsewhere, by `state`.
pub const DUPLICATES: &str = "verimail_worker_duplicates_total";
/// Deliveries handed back because the database failed.
pub const DB_ERRORS: &str = "verimail_worker_database_errors_total";
/// Time from delivery to ack, seconds.
pub const PROCESSING_SECONDS: &str = "verimail_worker_processing_seconds";
/// Time of one step of processing (`claim`, `store`, `publish`, `mark`), seconds.
pub const STEP_SECONDS: &str = "verimail_worker_step_seconds";
/// Time of one SMTP send including in-process retries, seconds, by `result`.
pub const SMTP_SECONDS: &str = "verimail_worker_smtp_seconds";
/// Time of one batched statement, seconds, by `statement` (`claim`, `finish`:
/// the conclusions with the marks; `round`: both in one transaction, the
/// commit included).
pub const BATCH_SECONDS: &str = "verimail_worker_batch_seconds";
/// Jobs served by one batched statement, by `statement` (for `round`: the
/// claims, conclusions and marks of one transaction).
pub const BATCH_SIZE: &str = "verimail_worker_batch_size";

const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// The process-wide recorder's handle (installed on first use).
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder already installed (an embedding program's):
            // ours then stays empty rather than taking over.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics stays empty");
            }
            describe();
            // After the recorder: handles taken before it would record nowhere.
            let _ = HANDLES.set(Handles::register());
            handle
        })
        .clone()
}

/// The series every mail records, registered once: through the macros each
/// call builds its key and looks it up in the registry (about a fifth of a
/// mail's metrics cost), through a handle it only records.
struct Handles {
    steps: [(&'static str, Histogram); 5],
    processing: Histogram,
    smtp_accepted: Histogram,
    sent: Counter,
}

/// Set by [`handle`] once the recorder is installed; until then (a test
/// without a worker) the macros record.
static HANDLES: OnceLock<Handles> = OnceLock::new();

impl Handles {
    fn register() -> Self {
        let step = |s: &'static str| (s, histogram!(STEP_SECONDS, "step" => s));
        Self {
            steps: [
                step("claim"),
                step("store"),
                step("publish"),
                step("ack"),
                step("mark"),
            ],
            processing: histogram!(PROCESSING_SECONDS),
            smtp_accepted: histogram!(SMTP_SECONDS, "result" => "accepted"),
            sent: counter!(OUTCOMES, "outcome" => "sent", "reason" => ""),
        }
    }
}

fn describe() {
    metrics::describe_counter!(OUTCOMES, "Outcome events published, by outcome and reason.");
    metrics::describe_counter!(
        RETRIES,
        "Requests moved to a retry queue after a transient failure."
    );
    metrics::describe_counter!(
        DEAD_LETTERS,
        "Messages moved to the dead-letter queue, by reason."
    );
    metrics::describe_counter!(
        DUPLICATES,
        "Deliveries of a request id already handled or in hand."
    );
    metrics::describe_counter!(
        DB_ERRORS,
        "Claims that failed because the database did (each retried in place, the message held)."
    );
    metrics::describe_histogram!(
        PROCESSING_SECONDS,
        metrics::Unit::Seconds,
        "Time from delivery to acknowledgement."
    );
    metrics::describe_histogram!(
        STEP_SECONDS,
        metrics::Unit::Seconds,
        "Time of one processing step: claim, store, publish, mark."
    );
    metrics::describe_histogram!(
        BATCH_SECONDS,
        metrics::Unit::Seconds,
        "Time of one batched statement (claims, conclusions, marks of many deliveries)."
    );
    metrics::describe_histogram!(
        BATCH_SIZE,
        "Requests served by one batched statement (one round trip, one commit)."
    );
    metrics::describe_histogram!(
        SMTP_SECONDS,
        metrics::Unit::Seconds,
        "Time of one send, in-process retries included."
    );
}

/// Counts a published outcome.
pub fn outcome(outcome: &'static str, reason: &'static str) {
    if let Some(h) = HANDLES.get()
        && (outcome, reason) == ("sent", "")
    {
        return h.sent.increment(1);
    }
    counter!(OUTCOMES, "outcome" => outcome, "reason" => reason).increment(1);
}

/// Counts a delayed retry.
pub fn retry() {
    counter!(RETRIES).increment(1);
}

/// Counts a dead letter.
pub fn dead_letter(reason: &'static str) {
    counter!(DEAD_LETTERS, "reason" => reason).increment(1);
}

/// Counts a duplicate delivery.
pub fn duplicate(state: &'static str) {
    counter!(DUPLICATES, "state" => state).increment(1);
}

/// Counts a claim that failed because the database did (retried in place).
pub fn db_error() {
    counter!(DB_ERRORS).increment(1);
}

/// Records the processing time of one delivery.
pub fn processing(elapsed: Duration) {
    if let Some(h) = HANDLES.get() {
        return h.processing.record(elapsed.as_secs_f64());
    }
    histogram!(PROCESSING_SECONDS).record(elapsed.as_secs_f64());
}

/// Records the time of one processing step.
pub fn step(step: &'static str, elapsed: Duration) {
    if let Some((_, h)) = HANDLES
        .get()
        .and_then(|h| h.steps.iter().find(|(s, _)| *s == step))
    {
        return h.record(elapsed.as_secs_f64());
    }
    histogram!(STEP_SECONDS, "step" => step).record(elapsed.as_secs_f64());
}

/// Records the time of one send.
pub fn smtp(elapsed: Duration, result: &'static str) {
    if let Some(h) = HANDLES.get()
        && result == "accepted"
    {
        return h.smtp_accepted.record(elapsed.as_secs_f64());
    }
    histogram!(SMTP_SECONDS, "result" => result).record(elapsed.as_secs_f64());
}

/// Records one batched statement: its kind, how many requests it served, how long it took.
pub fn batch(statement: &'static str, size: usize, elapsed: Duration) {
    histogram!(BATCH_SECONDS, "statement" => statement).record(elapsed.as_secs_f64());
    // Exact in f64: batches hold at most a few hundred requests.
    histogram!(BATCH_SIZE, "statement" => statement).record(size as f64);
}
