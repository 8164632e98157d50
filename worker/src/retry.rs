//! Routing of delayed retries and dead letters: which retry queue a request
//! waits in, and which headers its copy carries.
//!
//! A request whose delivery failed transiently is re-published, body intact,
//! to the retry queue whose delay fits (`{ns}.retry.{n}s`); the broker moves
//! it back to `{ns}.worker` when the delay expires. The database holds the
//! authoritative attempt count and first-attempt time; the `x-verimail-retry`
//! header only helps a person reading a queue.

use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable, ShortString};
use verimail_shared::bus::{
    HEADER_DETAIL, HEADER_REASON, HEADER_REPLAYED, HEADER_RETRY, RETRY_DELAYS,
};

/// Header the worker puts on the dead-letter copy of a `delivery_failed`
/// request: the id of the `failed` outcome it published. A replay
/// (`verimail dead replay`) that carries it back makes the worker treat the
/// request as new once more (see [`crate::process`]).
pub const HEADER_FAILED_OUTCOME: &str = "x-verimail-failed-outcome";

/// Headers the broker adds when it dead-letters (expired retry copies): they
/// are dropped from copies we publish, so they do not pile up.
const BROKER_HEADERS: [&str; 7] = [
    "x-death",
    "x-first-death-reason",
    "x-first-death-queue",
    "x-first-death-exchange",
    "x-last-death-reason",
    "x-last-death-queue",
    "x-last-death-exchange",
];

/// How long a request waits before its next attempt, `attempts` counting this
/// failed one (1 after the first failure): the delays grow with attempts, never
/// exceed what is left of the retry window (`remaining`), and are at least the
/// shortest tier.
pub fn retry_delay(attempts: u32, remaining: Duration) -> Duration {
    let idx = usize::try_from(attempts.saturating_sub(1))
        .unwrap_or(usize::MAX)
        .min(RETRY_DELAYS.len() - 1);
    let by_attempt = RETRY_DELAYS[idx];
    let fits = RETRY_DELAYS
        .iter()
        .rev()
        .copied()
        .find(|d| *d <= remaining)
        .unwrap_or(RETRY_DELAYS[0]);
    by_attempt.min(fits).max(RETRY_DELAYS[0])
}

/// The retry count a copy carried (0 for a first delivery).
pub fn retry_count(headers: Option<&FieldTable>) -> u32 {
    let Some(value) = headers.and_then(|h| h.inner().get(HEADER_RETRY)) else {
        return 0;
    };
    let n = match value {
        AMQPValue::LongLongInt(n) => *n,
        AMQPValue::LongInt(n) => i64::from(*n),
        AMQPValue::ShortInt(n) => i64::from(*n),
        AMQPValue::LongUInt(n) => i64::from(*n),
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).parse().unwrap_or(0),
        _ => 0,
    };
    u32::try_from(n).unwrap_or(0)
}

/// The headers of a copy sent to a retry queue: the original's, without the
/// broker's dead-lettering bookkeeping and the replay marker, with the retry
/// count set.
pub fn retry_headers(original: Option<&FieldTable>, retry: u32) -> FieldTable {
    // A replay's marker counts once, on its first delivery: a retry copy of
    // a replay is an ordinary retry.
    let mut headers = carried(original, &[HEADER_REPLAYED]);
    headers.insert(
        ShortString::from(HEADER_RETRY),
        AMQPValue::LongLongInt(i64::from(retry)),
    );
    headers
}

/// The headers of a dead-letter copy: the original's (without the broker's
/// bookkeeping, our retry count and any earlier reason or replay marker) plus
/// `extra` (reason, detail, failed-outcome id).
pub fn dead_headers(original: Option<&FieldTable>, extra: FieldTable) -> FieldTable {
    let mut headers = carried(
        original,
        &[
            HEADER_RETRY,
            HEADER_REASON,
            HEADER_DETAIL,
            HEADER_FAILED_OUTCOME,
        ],
    );
    for (k, v) in extra.inner() {
        headers.insert(k.clone(), v.clone());
    }
    headers
}

fn carried(original: Option<&FieldTable>, also_drop: &[&str]) -> FieldTable {
    let mut headers = FieldTable::default();
    if let Some(original) = original {
        for (k, v) in original.inner() {
            let name = k.as_str();
            if !BROKER_HEADERS.contains(&name) && !also_drop.contains(&name) {
                headers.insert(k.clone(), v.clone());
            }
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use verimail_shared::bus::{dead_letter_headers, header_str};

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn delays_grow_with_attempts() {
        let window = S(900);
        assert_eq!(retry_delay(1, window), S(5));
        assert_eq!(retry_delay(2, window), S(30));
        assert_eq!(retry_delay(3, window), S(120));
        assert_eq!(retry_delay(4, window), S(600));
        assert_eq!(retry_delay(9, window), S(600));
    }

    #[test]
    fn a_delay_never_outlasts_the_rest_of_the_window_but_is_at_least_the_first_tier() {
        assert_eq!(retry_delay(4, S(200)), S(120));
        assert_eq!(retry_delay(3, S(29)), S(5));
        assert_eq!(retry_delay(2, S(1)), S(5));
        assert_eq!(retry_delay(0, S(0)), S(5));
    }

    #[test]
    fn retry_copies_count_up_and_shed_the_brokers_bookkeeping() {
        let mut original = FieldTable::default();
        original.insert("x-death".into(), AMQPValue::LongString("..".into()));
        original.insert("x-custom".into(), AMQPValue::LongString("kept".into()));
        let first = retry_headers(Some(&original), retry_count(Some(&original)) + 1);
        assert_eq!(retry_count(Some(&first)), 1);
        assert!(!first.inner().contains_key("x-death"));
        assert_eq!(
            header_str(Some(&first), "x-custom").as_deref(),
            Some("kept")
        );
        let second = retry_headers(Some(&first), retry_count(Some(&first)) + 1);
        assert_eq!(retry_count(Some(&second)), 2);
    }

    #[test]
    fn a_dead_copy_carries_only_the_new_reason() {
        let mut original = retry_headers(None, 3);
        original.insert(
            HEADER_FAILED_OUTCOME.into(),
            AMQPValue::LongString("old".into()),
        );
        let mut extra = dead_letter_headers("delivery_failed", "451 try later");
        extra.insert(
            HEADER_FAILED_OUTCOME.into(),
            AMQPValue::LongString("new".into()),
        );
        let dead = dead_headers(Some(&original), extra);
        assert_eq!(retry_count(Some(&dead)), 0);
        assert_eq!(
            header_str(Some(&dead), HEADER_REASON).as_deref(),
            Some("delivery_failed")
        );
        assert_eq!(
            header_str(Some(&dead), HEADER_FAILED_OUTCOME).as_deref(),
            Some("new")
        );
    }
}
