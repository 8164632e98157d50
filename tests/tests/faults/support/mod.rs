//! What every fault scenario stands on: a deployment with a tap that survives
//! a broker restart (`pipeline`, `tap`), the figures each scenario prints and
//! asserts on (`figures`), a clicker that keeps trying (`clicks`), and the
//! guards that stop the machine's broker or database and always start them
//! again (`machine`).

mod clicks;
mod figures;
mod machine;
mod pipeline;
mod tap;

use std::sync::{Mutex, MutexGuard, PoisonError};

pub use clicks::{Clicks, click_all};
pub use figures::Figures;
pub use machine::{BrokerDown, DatabaseDown, Outage, machine_faults_allowed};
pub use pipeline::{Pipeline, dead_letters, quiesce, request_body, rss_kib, start_gateway};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
