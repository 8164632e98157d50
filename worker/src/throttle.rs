//! The throttle: at most one mail per user and purpose every
//! `THROTTLE_SECONDS`, across every worker process.
//!
//! The decision is one atomic upsert on `throttle (user_id, purpose)`, run in
//! the same statement that claims the request ([`crate::store::Store::claim`]):
//! the row is inserted, or its `last_sent_at` moved to now, only when the
//! previous mail is older than the interval or the row is held by this very
//! request id (a redelivery). PostgreSQL's row lock on the conflicting key
//! serialises concurrent requests for one user: exactly one passes.
//! The request row records `throttle_passed`, so a retried request is never
//! throttled by itself. When no mail goes out in the end (refused, failed),
//! the request gives the throttle back; when the mail is sent, `last_sent_at`
//! becomes the time the SMTP server accepted it, unless that is within a
//! second of the claim (then the claim's time stands: the window may open up
//! to a second early, and a write per mail is saved).

use std::time::Duration;

/// The interval to enforce, `None` when `THROTTLE_SECONDS=0` turns it off.
pub fn interval(throttle: Duration) -> Option<Duration> {
    (!throttle.is_zero()).then_some(throttle)
}

/// `retry_after_seconds` of a `throttled` outcome: the time left, rounded up to
/// whole seconds, at least 1 (also when the holder gave the throttle back
/// meanwhile: the client may simply ask again).
pub fn retry_after_seconds(remaining: Option<f64>) -> u64 {
    let secs = remaining.unwrap_or(0.0).ceil();
    if secs.is_finite() && secs >= 1.0 {
        // Bounded by THROTTLE_SECONDS, far below u64::MAX.
        secs as u64
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_and_is_at_least_one() {
        assert_eq!(retry_after_seconds(Some(59.2)), 60);
        assert_eq!(retry_after_seconds(Some(1.0)), 1);
        assert_eq!(retry_after_seconds(Some(0.3)), 1);
        assert_eq!(retry_after_seconds(Some(-4.0)), 1);
        assert_eq!(retry_after_seconds(None), 1);
        assert_eq!(retry_after_seconds(Some(f64::NAN)), 1);
    }

    #[test]
    fn zero_seconds_turns_the_throttle_off() {
        assert_eq!(interval(Duration::ZERO), None);
        assert_eq!(
            interval(Duration::from_secs(60)),
            Some(Duration::from_secs(60))
        );
    }
}
