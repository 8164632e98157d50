//! The tap: an exclusive queue bound to a namespace that counts (and, for the
//! latency run, times) the outcome events as they arrive.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use futures_util::StreamExt;
use lapin::Connection;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use verimail_shared::events::{
    EMAIL_VERIFIED, VERIFICATION_FAILED, VERIFICATION_SENT, VERIFICATION_THROTTLED,
};

/// Outcome events of a namespace, counted (and timed, for latency) as they arrive
/// on an exclusive queue bound to `{ns}`; consumed without acks, so the tap
/// costs the broker as little as possible.
#[derive(Debug, Clone)]
pub(crate) struct Tap {
    state: Arc<TapState>,
}

#[derive(Debug, Default)]
pub(crate) struct TapState {
    sent: AtomicU64,
    throttled: AtomicU64,
    failed: AtomicU64,
    verified: AtomicU64,
    other: AtomicU64,
    /// Events whose id was seen before (at-least-once re-sends); not counted above.
    duplicates: AtomicU64,
    ids: Mutex<std::collections::HashSet<String>>,
    first_at: Mutex<Option<Instant>>,
    last_at: Mutex<Option<Instant>>,
    samples: Mutex<Vec<Sample>>,
    failures: Mutex<Vec<String>>,
}

/// One `sent` outcome of the latency run.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    pub(crate) phase: String,
    /// data.sent_at − the publish time stamped in data.context, ms.
    pub(crate) to_sent_ms: f64,
    /// Arrival at the tap − the publish time, ms.
    pub(crate) to_arrival_ms: f64,
}

impl Tap {
    pub(crate) async fn start(
        conn: &Connection,
        exchange: &str,
        patterns: &[&str],
        parse: bool,
    ) -> Result<Self> {
        let ch = conn.create_channel().await?;
        let queue = verimail_shared::bus::bind_temporary_queue(&ch, exchange, patterns).await?;
        let mut consumer = ch
            .basic_consume(
                queue,
                "bench-tap".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let state = Arc::new(TapState::default());
        let sink = state.clone();
        tokio::spawn(async move {
            // Keeps the channel open as long as the task runs.
            let _ch = ch;
            while let Some(Ok(delivery)) = consumer.next().await {
                let now = Instant::now();
                let id = delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|m| m.as_str().to_owned())
                    .unwrap_or_default();
                let fresh = sink
                    .ids
                    .lock()
                    .map(|mut ids| ids.insert(id))
                    .unwrap_or(true);
                if !fresh {
                    sink.duplicates.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                // The sample first, the count after: a waiter that sees the
                // count reached reads every sample (counted first, the last
                // sample could still be on its way, and a run looked one short).
                if parse && delivery.routing_key.as_str() == VERIFICATION_SENT {
                    let arrived = OffsetDateTime::now_utc();
                    if let Some(sample) = sample_of(&delivery.data, arrived)
                        && let Ok(mut s) = sink.samples.lock()
                    {
                        s.push(sample);
                    }
                }
                let counter = match delivery.routing_key.as_str() {
                    VERIFICATION_SENT => &sink.sent,
                    VERIFICATION_THROTTLED => &sink.throttled,
                    VERIFICATION_FAILED => &sink.failed,
                    EMAIL_VERIFIED => &sink.verified,
                    _ => &sink.other,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut first) = sink.first_at.lock() {
                    first.get_or_insert(now);
                }
                if let Ok(mut last) = sink.last_at.lock() {
                    *last = Some(now);
                }
                if delivery.routing_key.as_str() == VERIFICATION_FAILED
                    && let Ok(mut f) = sink.failures.lock()
                    && f.len() < 5
                {
                    f.push(String::from_utf8_lossy(&delivery.data).into_owned());
                }
            }
        });
        Ok(Self { state })
    }

    pub(crate) fn total(&self) -> u64 {
        let s = &self.state;
        s.sent.load(Ordering::Relaxed)
            + s.throttled.load(Ordering::Relaxed)
            + s.failed.load(Ordering::Relaxed)
            + s.verified.load(Ordering::Relaxed)
            + s.other.load(Ordering::Relaxed)
    }

    pub(crate) fn sent(&self) -> u64 {
        self.state.sent.load(Ordering::Relaxed)
    }

    pub(crate) fn breakdown(&self) -> String {
        let s = &self.state;
        format!(
            "sent {}, throttled {}, failed {}, verified {}, other {}, duplicate ids {}",
            s.sent.load(Ordering::Relaxed),
            s.throttled.load(Ordering::Relaxed),
            s.failed.load(Ordering::Relaxed),
            s.verified.load(Ordering::Relaxed),
            s.other.load(Ordering::Relaxed),
            s.duplicates.load(Ordering::Relaxed)
        )
    }

    pub(crate) fn first_at(&self) -> Option<Instant> {
        self.state.first_at.lock().ok().and_then(|g| *g)
    }

    pub(crate) fn last_at(&self) -> Option<Instant> {
        self.state.last_at.lock().ok().and_then(|g| *g)
    }

    pub(crate) fn failures(&self) -> Vec<String> {
        self.state
            .failures
            .lock()
            .map(|f| f.clone())
            .unwrap_or_default()
    }

    pub(crate) fn samples(&self, phase: &str) -> Vec<Sample> {
        self.state
            .samples
            .lock()
            .map(|s| s.iter().filter(|x| x.phase == phase).cloned().collect())
            .unwrap_or_default()
    }

    /// Waits until `n` events arrived; gives up when none arrived for `stall`.
    /// Returns how many arrived.
    pub(crate) async fn wait(&self, n: usize, stall: Duration) -> usize {
        self.wait_with(n, stall, || true).await
    }

    /// Like [`Tap::wait`], also giving up as soon as `alive` says no.
    pub(crate) async fn wait_with(
        &self,
        n: usize,
        stall: Duration,
        mut alive: impl FnMut() -> bool,
    ) -> usize {
        let mut seen = self.total();
        let mut progress = Instant::now();
        let mut last_print = Instant::now();
        loop {
            let now = self.total();
            if now >= n as u64 {
                return usize::try_from(now).unwrap_or(usize::MAX);
            }
            if now != seen {
                seen = now;
                progress = Instant::now();
            }
            if progress.elapsed() >= stall || !alive() {
                return usize::try_from(now).unwrap_or(usize::MAX);
            }
            if last_print.elapsed() >= Duration::from_secs(5) {
                println!("    … {now}/{n} outcomes");
                last_print = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

pub(crate) fn sample_of(body: &[u8], arrived: OffsetDateTime) -> Option<Sample> {
    let event: Value = serde_json::from_slice(body).ok()?;
    let data = &event["data"];
    let context = &data["context"];
    let published = parse_time(context["bench_published_at"].as_str()?)?;
    let sent = parse_time(data["sent_at"].as_str()?)?;
    Some(Sample {
        phase: context["bench_phase"].as_str()?.to_owned(),
        to_sent_ms: (sent - published).as_seconds_f64() * 1e3,
        to_arrival_ms: (arrived - published).as_seconds_f64() * 1e3,
    })
}

pub(crate) fn parse_time(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).ok()
}
