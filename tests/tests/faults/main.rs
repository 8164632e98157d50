//! Fault injection: the real binaries, the machine's RabbitMQ and PostgreSQL and
//! an SMTP server inside the test, while something breaks on purpose (a worker
//! killed with SIGKILL, the broker or the database restarted, the SMTP server
//! gone, the gateway without a broker, a flood of poison).
//!
//! Each scenario prints its figures (requests, outcomes, mails, duplicates,
//! lost) with `println!` (`cargo test --test faults -- --nocapture` shows them)
//! and puts them in every failing assertion's message.
//!
//! The tests here run one at a time ([`SERIAL`]). The two that restart the
//! machine's broker or database cut every connection on the machine, so they
//! run only with `VERIMAIL_FAULT_TESTS=1`: `scripts/test.sh` sets it and runs
//! them alone, after every other test binary.
//!
//! The rooms: `crashes` (a worker killed), `restarts` (the machine's broker
//! and database, the two gated tests), `smtp_outage`, `no_broker` (the
//! gateway alone), `poison`; `support` holds the deployment, the tap, the
//! figures, the clicker and the guards that put the machine's services back.

mod crashes;
mod no_broker;
mod poison;
mod restarts;
mod smtp_outage;
mod support;

use std::time::Duration;

/// One fault scenario at a time (see the module docs).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long a service may take to become ready.
const READY: Duration = Duration::from_secs(45);
/// Worker concurrency in these tests (also the most deliveries in flight when a
/// worker dies, so the most mails a crash can send twice).
const CONCURRENCY: usize = 16;
/// Clicks come from 127.0.0.1 by the hundred: the rate limit is not under test here.
const NO_RATE_LIMIT: &str = "1000000";
