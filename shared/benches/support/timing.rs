//! The timing loop of the plain bench binaries (`shared/benches/token.rs`,
//! `worker/benches/render.rs`, which include this file by path): no harness,
//! no criterion.

use std::time::{Duration, Instant};

const WARM_UP: Duration = Duration::from_millis(100);
const MEASURE: Duration = Duration::from_millis(500);

/// Warms `op` up, then runs timed batches of `batch` calls for about half a
/// second and answers the best batch's mean in nanoseconds per call: the one
/// least disturbed by other processes.
pub fn best_mean_ns(batch: u32, mut op: impl FnMut()) -> f64 {
    let start = Instant::now();
    while start.elapsed() < WARM_UP {
        for _ in 0..batch {
            op();
        }
    }
    let mut best = f64::INFINITY;
    let start = Instant::now();
    while start.elapsed() < MEASURE {
        let timed = Instant::now();
        for _ in 0..batch {
            op();
        }
        best = best.min(timed.elapsed().as_nanos() as f64 / f64::from(batch));
    }
    best
}
