//! Figures read from what the tap saw: the longest stretch without progress
//! (by the tap's clock and by the outcomes' own), and the knobs of a run.

use std::time::{Duration, Instant};

use time::OffsetDateTime;

/// The longest gap between consecutive instants, and where it started (as
/// an offset from `since`, negative when before it).
pub fn longest_gap(at: &[Instant], since: Instant) -> (Duration, f64) {
    longest_gap_in(at, since, None)
}

/// Like [`longest_gap`], counting only gaps that begin within `window`.
pub fn longest_gap_in(
    at: &[Instant],
    since: Instant,
    window: Option<(Instant, Instant)>,
) -> (Duration, f64) {
    let mut at = at.to_vec();
    at.sort();
    let mut best = (Duration::ZERO, 0.0);
    for w in at.windows(2) {
        if window.is_some_and(|(from, to)| w[0] < from || w[0] >= to) {
            continue;
        }
        let gap = w[1] - w[0];
        if gap > best.0 {
            let offset = if w[0] >= since {
                (w[0] - since).as_secs_f64()
            } else {
                -(since - w[0]).as_secs_f64()
            };
            best = (gap, offset);
        }
    }
    best
}

pub fn longest_time_gap(mut at: Vec<OffsetDateTime>) -> Duration {
    at.sort();
    at.windows(2)
        .map(|w| Duration::try_from(w[1] - w[0]).unwrap_or_default())
        .max()
        .unwrap_or_default()
}

pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
