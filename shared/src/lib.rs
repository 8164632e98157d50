//! verimail's common crate: what crosses a process boundary.
//!
//! - [`events`]: CloudEvents envelopes, typed data, strict request decoding.
//! - [`token`]: the `v1` link format and itsdangerous compatibility.
//! - [`config`]: every environment variable of the contract.
//! - [`bus`]: exchange and queue names, declaration, connections, confirmed publishing.
//! - `db` (feature `db`, on by default): the PostgreSQL pool and embedded
//!   migrations; `retention`: the clean-up of old records.
//! - [`suppression`]: the suppression list (reasons, entries; its SQL with `db`).
//! - [`telemetry`], [`shutdown`]: logging and signal handling for the binaries.

pub mod bus;
pub mod config;
#[cfg(feature = "db")]
pub mod db;
pub mod events;
#[cfg(feature = "db")]
pub mod retention;
pub mod shutdown;
pub mod suppression;
pub mod telemetry;
pub mod token;

pub use config::{Config, ConfigError};
