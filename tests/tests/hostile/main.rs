//! Hostile input, end to end: requests published on the raw bus (the CLI and
//! the client library validate before publishing, an attacker or a buggy
//! upstream does not) and links fetched from the gateway, each with the one
//! answer the contract gives it, and nothing else: no mail for a refused
//! request, no outcome for a dead letter, no confirmation for a bad token,
//! never a 5xx.
//!
//! Each case prints one line (`cargo test --test hostile -- --nocapture`).
//!
//! The rooms: `requests` (hostile requests on the raw bus, each case with its
//! expected answer), `links` (hostile tokens and headers at the gateway);
//! `support` holds the deployment both start.

mod links;
mod requests;
mod support;

use std::time::Duration;

const WAIT: Duration = Duration::from_secs(45);
/// The only origin a `return_url` may point to here.
const APP: &str = "https://app.example.com";
