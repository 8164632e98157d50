//! Test support shared by the integration and end-to-end tests: an SMTP
//! server with fault injection, fresh namespaces and databases, event capture.

pub mod smtp;
