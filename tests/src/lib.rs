//! Test support shared by the integration and end-to-end tests: an SMTP
//! server with fault injection, fresh namespaces and databases, the real
//! binaries as processes, event capture, positive signals that a deployment
//! has settled, and a tiny HTTP client.

pub mod api;
pub mod env;
pub mod http;
pub mod procs;
pub mod settle;
pub mod smtp;
pub mod tap;
