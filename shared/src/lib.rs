//! verimail's common crate: what crosses a process boundary.
//!
//! - [`events`]: CloudEvents envelopes, typed data, strict request decoding.
//! - [`token`]: the `v1` link format and itsdangerous compatibility.
//! - [`config`]: every environment variable of the contract.
//! - [`bus`]: exchange and queue names, declaration, connections, confirmed publishing.
//! - [`db`]: the PostgreSQL pool and embedded migrations.
//! - [`telemetry`], [`shutdown`]: logging and signal handling for the binaries.

pub mod bus;
pub mod config;
pub mod db;
pub mod events;
pub mod retention;
pub mod shutdown;
pub mod telemetry;
pub mod token;

pub use config::{Config, ConfigError};
