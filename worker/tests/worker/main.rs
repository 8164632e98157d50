//! The worker against real RabbitMQ and PostgreSQL, in-process, each test in
//! its own namespace and database. One test binary, a room per concern:
//! [`outcomes`] (each request's one answer), [`retries`] (transient failures
//! and replays), [`operations`] (probes, metrics, stop, outages of the broker
//! and the database), [`smtp_flows`] (the SMTP conversation), [`hardening`]
//! (a slow or stuck database) and [`store_sql`] (the statements alone).

mod hardening;
mod operations;
mod outcomes;
mod retries;
mod smtp_flows;
mod store_sql;
// Shared with any other test binary of the worker: outside this folder.
#[path = "../support/mod.rs"]
mod support;

use std::time::Duration;

use serde_json::Value;

/// How long a test waits for an outcome, a mail or a dead letter.
const WAIT: Duration = Duration::from_secs(20);

/// `data.{field}` of an event as a string (empty when absent).
fn data_str<'a>(event: &'a Value, field: &str) -> &'a str {
    event["data"][field].as_str().unwrap_or_default()
}
