//! Every row of the contract's HTTP table, through the router with `oneshot`,
//! each test on its own PostgreSQL database.
//!
//! Rooms: [`verify`] (`verify_email` links, on GET and by the button),
//! [`reset`] (`reset_password`: the form, the proof, single use), [`bad_links`]
//! (expired, malformed, unknown paths), [`legacy`] (itsdangerous tokens),
//! [`protection`] (rate limit, trusted proxies, security headers) and
//! [`operations`] (probes, metrics, an unreachable database). Here: reading
//! the confirmations table.

#[path = "../common/mod.rs"]
mod common;

mod bad_links;
mod legacy;
mod operations;
mod protection;
mod reset;
mod verify;

use common::TestApp;

/// The event id recorded with the confirmation `key`.
fn confirmations_key_event(rows: &[(String, String)], key: &str) -> Option<String> {
    rows.iter().find(|(k, _)| k == key).map(|(_, e)| e.clone())
}

/// Every confirmation as (key, event id), by key.
async fn confirmations(app: &TestApp) -> Vec<(String, String)> {
    sqlx::query_as("SELECT key, event_id FROM confirmations ORDER BY key")
        .fetch_all(app.pool())
        .await
        .expect("read confirmations")
}
