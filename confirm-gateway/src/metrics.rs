//! The gateway's Prometheus metrics, in a recorder of its own (not the global
//! one), so several gateways in one test process keep separate counts.

use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::answer::Status;

const REQUESTS: &str = "verimail_gateway_confirm_requests_total";
const DURATION: &str = "verimail_gateway_confirm_duration_seconds";
const BACKLOG: &str = "verimail_gateway_outbox_backlog";
const PUBLISHED: &str = "verimail_gateway_events_published_total";
const PUBLISH_FAILURES: &str = "verimail_gateway_publish_failures_total";
const EXPIRED: &str = "verimail_gateway_outbox_expired_total";
const BATCH_SECONDS: &str = "verimail_gateway_batch_seconds";
const BATCH_SIZE: &str = "verimail_gateway_batch_size";
const CODE_CHECKS: &str = "verimail_gateway_code_checks_total";
const WEBHOOKS: &str = "verimail_gateway_webhook_notifications_total";
const SUPPRESSIONS: &str = "verimail_suppressions";

/// Latency buckets, in seconds: a confirm takes milliseconds; 5 s is the
/// unavailable deadline.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Handles to every metric, registered once.
#[derive(Clone)]
pub struct Metrics {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
    by_status: Arc<[(Status, Counter)]>,
    duration: Histogram,
    batch_seconds: Histogram,
    batch_size: Histogram,
    backlog: Gauge,
    published: Counter,
    publish_failures: Counter,
    expired: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

static META: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

impl Metrics {
    /// A fresh registry with every metric at zero.
    pub fn new() -> Self {
        let builder = PrometheusBuilder::new();
        // The buckets are a non-empty constant: this cannot fail.
        let builder = builder
            .set_buckets(&BUCKETS)
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = Arc::new(builder.build_recorder());
        let describe = |name: &'static str, help: &'static str| {
            recorder.describe_counter(KeyName::from_const_str(name), None, help.into());
        };
        describe(REQUESTS, "Answers of /confirm by outcome status.");
        describe(DURATION, "Time to answer /confirm, in seconds.");
        describe(
            BATCH_SECONDS,
            "Time to write one batch of confirmations (one statement, one commit), in seconds.",
        );
        describe(
            BATCH_SIZE,
            "Confirmations written by one batch (one statement, one commit).",
        );
        describe(
            BACKLOG,
            "Verified events waiting in the outbox for the broker.",
        );
        describe(PUBLISHED, "Verified events the broker confirmed.");
        describe(
            CODE_CHECKS,
            "Answers of /v1/codes/verify by status (a surge of wrong_code or locked is guessing).",
        );
        describe(
            WEBHOOKS,
            "Provider notifications (/v1/webhooks/{provider}) by provider and result: acted, duplicate, ignored, confirmed, unauthorized, invalid, not_found, unavailable.",
        );
        recorder.describe_gauge(
            KeyName::from_const_str(SUPPRESSIONS),
            None,
            "Entries of the suppression list by reason (read at scrape time).".into(),
        );
        describe(
            PUBLISH_FAILURES,
            "Outbox publish attempts that failed (retried later).",
        );
        describe(
            EXPIRED,
            "Verified events dropped from the outbox unpublished after RETENTION_HOURS.",
        );
        let by_status: Vec<(Status, Counter)> = Status::ALL
            .iter()
            .map(|&s| {
                let key = Key::from_parts(REQUESTS, vec![Label::new("status", s.as_str())]);
                (s, recorder.register_counter(&key, &META))
            })
            .collect();
        Self {
            handle: recorder.handle(),
            by_status: by_status.into(),
            duration: recorder.register_histogram(&Key::from_name(DURATION), &META),
            batch_seconds: recorder.register_histogram(&Key::from_name(BATCH_SECONDS), &META),
            batch_size: recorder.register_histogram(&Key::from_name(BATCH_SIZE), &META),
            backlog: recorder.register_gauge(&Key::from_name(BACKLOG), &META),
            published: recorder.register_counter(&Key::from_name(PUBLISHED), &META),
            publish_failures: recorder.register_counter(&Key::from_name(PUBLISH_FAILURES), &META),
            expired: recorder.register_counter(&Key::from_name(EXPIRED), &META),
            recorder,
        }
    }

    /// Counts one `/confirm` answer.
    pub fn answered(&self, status: Status, took: Duration) {
        if let Some((_, counter)) = self.by_status.iter().find(|(s, _)| *s == status) {
            counter.increment(1);
        }
        self.duration.record(took.as_secs_f64());
    }

    /// Counts one `/v1/codes/verify` answer by its status word (never the
    /// code, the user or the key: labels stay few and say nothing secret).
    pub fn code_checked(&self, status: &'static str) {
        let key = Key::from_parts(CODE_CHECKS, vec![Label::new("status", status)]);
        self.recorder.register_counter(&key, &META).increment(1);
    }

    /// Counts `n` webhook notices (or calls) of `provider` with `result`.
    pub fn webhook(&self, provider: &'static str, result: &'static str, n: u64) {
        if n == 0 {
            return;
        }
        let key = Key::from_parts(
            WEBHOOKS,
            vec![
                Label::new("provider", provider),
                Label::new("result", result),
            ],
        );
        self.recorder.register_counter(&key, &META).increment(n);
    }

    /// Sets the suppression list's size per reason.
    pub fn suppressions(&self, counts: &[(verimail_shared::suppression::SuppressionReason, i64)]) {
        for (reason, n) in counts {
            let key = Key::from_parts(SUPPRESSIONS, vec![Label::new("reason", reason.as_str())]);
            self.recorder.register_gauge(&key, &META).set(*n as f64);
        }
    }

    /// Records one written batch of confirmations.
    pub fn batch(&self, size: usize, took: Duration) {
        self.batch_seconds.record(took.as_secs_f64());
        // Exact in f64: a batch holds at most a few hundred confirmations.
        self.batch_size.record(size as f64);
    }

    /// Sets the outbox backlog.
    pub fn backlog(&self, rows: i64) {
        self.backlog.set(rows as f64);
    }

    /// Counts events the broker confirmed.
    pub fn published(&self, n: u64) {
        self.published.increment(n);
    }

    /// Counts failed publish attempts.
    pub fn publish_failed(&self, n: u64) {
        self.publish_failures.increment(n);
    }

    /// Counts events dropped unpublished after the retention.
    pub fn expired(&self, n: u64) {
        self.expired.increment(n);
    }

    /// Folds recent histogram samples so memory stays bounded (called periodically).
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        // Keep the recorder alive as long as the handles (they share it).
        let _ = &self.recorder;
        self.handle.render()
    }
}
