//! The `verimail` binary against the real RabbitMQ and PostgreSQL, each test
//! in a namespace of its own. One test binary (one link, one run of the
//! binary's build) with a room per subcommand; what they share is in
//! [`support`].

// The broker helpers of the client library's tests (a namespace per test,
// direct access to queues), shared rather than copied.
#[path = "../../../producer/tests/common/mod.rs"]
mod common;
mod support;

mod dead;
mod listen;
mod migrate;
mod outbox;
mod publish;
mod suppression;
mod token;
mod usage;
