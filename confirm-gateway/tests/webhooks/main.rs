//! `/v1/webhooks/{provider}` and `/v1/suppressions` through the router, on a
//! real database: each provider's notification signed the way the provider
//! documents it, with keys made here (an ECDSA P-256 key for SendGrid, an RSA
//! certificate made with `openssl` for SNS, put in the certificate cache as a
//! fetched one would be); tampered and unsigned ones answer 401 and change
//! nothing; a notification delivered twice has one effect; the events reach
//! the bus.
//!
//! A room per provider ([`mailgun`], [`sendgrid`], [`postmark`], [`ses`]),
//! each with its own "sign it as the provider does and POST it" helper;
//! [`all_providers`] for what holds for every one of them, [`suppression_api`]
//! for `/v1/suppressions`; [`support`] is what they share (a state with every
//! webhook on, a watched fetcher, reading the effects).

#[path = "../common/mod.rs"]
mod common;
mod support;

mod all_providers;
mod mailgun;
mod postmark;
mod sendgrid;
mod ses;
mod suppression_api;
